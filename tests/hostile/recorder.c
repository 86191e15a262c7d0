/*
 * What a hostile pod plants where a careless privileged agent would run it: in place of its
 * dynamic loader, its python3, /etc/ld.so.preload, CRIU's plugin directory, an NSS module and a
 * criu action script. Built twice:
 *
 *   gcc -O2 -static-pie -nostdlib -fno-stack-protector -o recorder recorder.c    (x86_64)
 *       a freestanding program, so that it also runs when the kernel starts it as the program
 *       interpreter (PT_INTERP) of another program, where glibc's own start-up would crash;
 *   gcc -O2 -shared -fPIC -DRECORDER_LIBRARY -o librecorder.so recorder.c
 *       a library whose constructor records.
 *
 * Whenever it runs it appends one line to RECORDER_LOG (an absolute path, so the line lands in
 * whichever root it ran under):   ran as=<program|library> exe=<AT_EXECFN> capeff=<hex>
 *
 * The tests pass only when no line appears with more than the container's capabilities (on the
 * simulated pod: no line at all, since nothing of the pod's should run during a checkpoint).
 */
#ifndef RECORDER_LOG
#define RECORDER_LOG "/hibernate-hostile-ran.log"
#endif

#ifdef RECORDER_LIBRARY
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/auxv.h>
#include <unistd.h>

__attribute__((constructor)) static void recorder_library(void)
{
	char buf[4096], capeff[32] = "?", line[512];
	const char *exe = (const char *)getauxval(AT_EXECFN);
	int fd = open("/proc/self/status", O_RDONLY);
	if (fd >= 0) {
		ssize_t n = read(fd, buf, sizeof(buf) - 1);
		close(fd);
		char *p = n > 0 ? (buf[n] = '\0', strstr(buf, "CapEff:")) : NULL;
		if (p)
			sscanf(p, "CapEff:\t%31s", capeff);
	}
	int len = snprintf(line, sizeof(line), "ran as=library exe=%s capeff=%s\n", exe ? exe : "?", capeff);
	fd = open(RECORDER_LOG, O_WRONLY | O_CREAT | O_APPEND, 0666);
	if (fd >= 0) {
		if (write(fd, line, (size_t)len) < 0)
			len = 0;
		close(fd);
	}
}

#else /* the freestanding program */

#if !defined(__x86_64__)
#error "the freestanding recorder is written for x86_64"
#endif

static long sys3(long nr, long a, long b, long c)
{
	long ret;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(nr), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
	return ret;
}

static unsigned long cat(char *dst, unsigned long at, const char *src)
{
	while (*src && at < 500)
		dst[at++] = *src++;
	return at;
}

__attribute__((used)) static void recorder_main(long *sp)
{
	long argc = sp[0];
	char **envp = (char **)(sp + 1 + argc + 1);
	while (*envp)
		envp++;
	const char *exe = "?";
	for (unsigned long *aux = (unsigned long *)(envp + 1); aux[0]; aux += 2)
		if (aux[0] == 31) /* AT_EXECFN */
			exe = (const char *)aux[1];

	char status[4096], line[512], capeff[32] = "?";
	long fd = sys3(2 /* open */, (long)"/proc/self/status", 0, 0);
	if (fd >= 0) {
		long n = sys3(0 /* read */, fd, (long)status, sizeof(status) - 1);
		sys3(3 /* close */, fd, 0, 0);
		for (long i = 0; n > 0 && i + 8 < n; i++) {
			if (status[i] == 'C' && status[i + 1] == 'a' && status[i + 2] == 'p' && status[i + 3] == 'E' &&
			    status[i + 4] == 'f' && status[i + 5] == 'f' && status[i + 6] == ':') {
				long j = i + 7, k = 0;
				while (j < n && (status[j] == '\t' || status[j] == ' '))
					j++;
				while (j < n && status[j] != '\n' && k < 31)
					capeff[k++] = status[j++];
				capeff[k] = '\0';
				break;
			}
		}
	}
	/* The parent's command line says who ran it. */
	char path[64] = "/proc/", num[24], parent[128] = "?";
	long ppid = sys3(110 /* getppid */, 0, 0, 0), k = 0;
	do
		num[k++] = (char)('0' + ppid % 10);
	while ((ppid /= 10) && k < 20);
	unsigned long at = 6;
	while (k)
		path[at++] = num[--k];
	path[at] = '\0';
	at = cat(path, at, "/cmdline");
	path[at] = '\0';
	fd = sys3(2, (long)path, 0, 0);
	if (fd >= 0) {
		long n = sys3(0, fd, (long)parent, sizeof(parent) - 1);
		sys3(3, fd, 0, 0);
		for (long i = 0; i < n; i++)
			if (parent[i] == '\0' || parent[i] == '\n')
				parent[i] = ' ';
		parent[n > 0 ? n : 0] = '\0';
	}
	unsigned long len = cat(line, 0, "ran as=program exe=");
	len = cat(line, len, exe);
	len = cat(line, len, " parent=");
	len = cat(line, len, parent);
	len = cat(line, len, " capeff=");
	len = cat(line, len, capeff);
	line[len++] = '\n';
	fd = sys3(2, (long)RECORDER_LOG, 01 | 0100 | 02000 /* O_WRONLY|O_CREAT|O_APPEND */, 0666);
	if (fd >= 0) {
		sys3(1 /* write */, fd, (long)line, (long)len);
		sys3(3, fd, 0, 0);
	}
	sys3(231 /* exit_group */, 127, 0, 0);
}

__asm__(".globl _start\n"
	"_start:\n"
	"  mov %rsp, %rdi\n"
	"  and $-16, %rsp\n"
	"  call recorder_main\n");
#endif
