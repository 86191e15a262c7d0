"""A fake vLLM engine: the same sleep HTTP API, real memory, no GPU.

Run it with `python -m hibernate.engine.fake --model NAME --port 8000 --enable-sleep-mode`.
"""
