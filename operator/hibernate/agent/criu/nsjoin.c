/*
 * hibernate-nsjoin.so: moves criu into a pod's namespaces after the host has loaded it.
 *
 * The agent is root on the node, and a pod is hostile input (design.md). If criu were started
 * inside the pod's mount namespace (nsenter -m ... criu), the kernel would load it with the pod's
 * dynamic loader, and that loader would read the pod's /etc/ld.so.preload and libraries: the pod
 * would choose code that runs as host root with every capability. So the agent starts criu in its
 * own mount namespace, from its own filesystem, with this library preloaded:
 *
 *   LD_PRELOAD=<bundle>/lib/hibernate-nsjoin.so HIBERNATE_NSJOIN=net:5,ipc:6,uts:7,pid:8,mnt:9 \
 *       <bundle>/bin/criu dump ...          (fds 5-9: the pod's /proc/<init>/ns/<type> opened by the agent)
 *
 * By the time this constructor runs, the host's loader has mapped criu and every library it needs
 * from the host. The constructor then joins each namespace in the order given (the agent puts the
 * mount namespace last), forks so that criu runs inside the pod's pid namespace, makes that child
 * a session leader there (criu's --shell-job wants one), and returns into criu's main() in the
 * child. The parent waits and exits with the child's status.
 *
 * HIBERNATE_NSJOIN_NOEXEC=1 also installs a seccomp filter that refuses execve and execveat: a
 * dump reads the pod's live processes, and criu execs helpers (iptables, ip, tar) only for states
 * we never ask it to dump (a nested network or mount namespace); inside the pod those would be the
 * pod's binaries. A restore runs without it, because restored tasks inherit criu's filters, and it
 * reads only an image the agent wrote itself (root-only, checked before the restore).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

#define ENV_SPEC "HIBERNATE_NSJOIN"
#define ENV_NOEXEC "HIBERNATE_NSJOIN_NOEXEC"
/* An exit status criu does not use, so the agent can tell a failed join from a failed criu. */
#define EXIT_NSJOIN 125

#if defined(__x86_64__)
#define NSJOIN_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define NSJOIN_ARCH AUDIT_ARCH_AARCH64
#else
#error "hibernate-nsjoin: unsupported architecture"
#endif

static void fail(const char *what, const char *arg)
{
	int e = errno;
	dprintf(2, "hibernate-nsjoin: %s%s%s: %s\n", what, arg ? " " : "", arg ? arg : "", strerror(e));
	_exit(EXIT_NSJOIN);
}

static int nstype(const char *name)
{
	static const struct {
		const char *name;
		int type;
	} types[] = {
		{ "net", CLONE_NEWNET }, { "ipc", CLONE_NEWIPC }, { "uts", CLONE_NEWUTS },
		{ "pid", CLONE_NEWPID }, { "mnt", CLONE_NEWNS },  { "cgroup", CLONE_NEWCGROUP },
	};
	for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++)
		if (!strcmp(name, types[i].name))
			return types[i].type;
	return -1;
}

static void forbid_exec(void)
{
	/* Relative jumps: the x86_64 x32 check sits between the load of nr and the execve checks. */
	struct sock_filter filter[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, NSJOIN_ARCH, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
#if defined(__x86_64__)
		BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000, 2, 0), /* x32 syscalls: refused */
#endif
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_execve, 1, 0),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_execveat, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = { .len = sizeof(filter) / sizeof(filter[0]), .filter = filter };
	if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) != 0)
		fail("seccomp", NULL);
}

__attribute__((constructor)) static void hibernate_nsjoin(void)
{
	const char *spec = getenv(ENV_SPEC);
	char buf[256], *save = NULL, *tok;
	int joined_pid = 0, noexec;

	if (!spec || !*spec)
		return;
	if (strlen(spec) >= sizeof(buf)) {
		errno = E2BIG;
		fail("bad " ENV_SPEC, NULL);
	}
	strcpy(buf, spec);
	noexec = getenv(ENV_NOEXEC) != NULL;
	/* Nothing criu starts, and no task it restores, inherits these. */
	unsetenv(ENV_SPEC);
	unsetenv(ENV_NOEXEC);
	unsetenv("LD_PRELOAD");

	for (tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		char *colon = strchr(tok, ':'), *end;
		long fd;
		int type;

		if (!colon) {
			errno = EINVAL;
			fail("bad entry", tok);
		}
		*colon = '\0';
		type = nstype(tok);
		errno = 0;
		fd = strtol(colon + 1, &end, 10);
		if (type < 0 || errno || *end || fd < 3 || fd > 1024) {
			errno = EINVAL;
			fail("bad entry", tok);
		}
		if (setns((int)fd, type) != 0)
			fail("setns", tok);
		close((int)fd);
		if (type == CLONE_NEWPID)
			joined_pid = 1;
	}

	if (joined_pid) {
		/* setns(CLONE_NEWPID) moves only the children: criu itself must be one. */
		pid_t child = fork();
		int status;

		if (child < 0)
			fail("fork", NULL);
		if (child > 0) {
			while (waitpid(child, &status, 0) < 0)
				if (errno != EINTR)
					fail("waitpid", NULL);
			_exit(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
		}
		if (setsid() < 0)
			fail("setsid", NULL);
	}
	if (noexec)
		forbid_exec();
}
