import sys

from hibernate.cli import main

sys.exit(main())
