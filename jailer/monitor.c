/*
 * jailer-monitor: what stays beside a jailed program once it runs.
 *
 * The Python launcher builds the sandbox and starts the program; once the program has
 * exec'd it execs this monitor in its own process (same pid, so the program stays its
 * child, its parent-death signal and the service manager's MAINPID hold), handing it the
 * state below. A resident Python launcher costs ~8 MiB and ~50 us per notified syscall;
 * this costs ~1 MiB and a few us.
 *
 * The monitor does exactly what the launcher did from there on (jailer/launcher.py):
 *   - answers the program's seccomp notifications with the plan's rules, plus its steady
 *     rules once the program is ready, the more severe winning
 *     (jailer.layers.seccomp.StagedPolicy), naming every refusal on stderr (once per syscall and
 *     action) and in the status stream;
 *   - reads the program's notify socket: READY=1 makes it ready (status events "ready"
 *     and "stage", READY=1 and MAINPID to $NOTIFY_SOCKET), STATUS= lines are passed on;
 *   - forwards SIGTERM, SIGINT and SIGHUP to the program (or, when the program is a pid 1
 *     that may not handle them before its READY=1, kills the sandbox instead);
 *   - when the program ends: the "exited" event (SIGSYS if it was killed for a syscall),
 *     the cgroup removed, the sockets and pid file jailer made removed, the program's exit
 *     code (or 128 + signal) as its own;
 *   - or, when the profile restarts it (jailer.host.restart, whose decide() this repeats):
 *     the "restarting" event, the back-off (a stop signal meanwhile cancels it:
 *     "restart-cancelled"), then `jailer run` exec'd again in this process with the restart
 *     state (RESTART_FD, a memfd of lines, gets "restarted T") in $JAILER_RESTART_FD; what
 *     jailer made at the caller's paths stays for the next run. Past the rate limit:
 *     "gave-up", one line on stderr, and the ending above.
 *
 * State: `jailer-monitor STATE_FD`, STATE_FD a file of lines "key values...":
 *   pid N | pidfd N | listener N | notify N | status N   (descriptors: -1 when absent)
 *   stage setup|steady | guard 0|1 (signals before ready kill) | staging 0|1 (steady rules apply)
 *   cgroup PATH | made FD DIRFD NAME (a socket or pid file jailer made: removed from the
 *   inherited directory DIRFD only while NAME is still the inode FD holds, jailer.host.paths.Made)
 *   | tidy FD DIRFD NAME (the directory a program binds its socket in: removed with the
 *   entries in it while it is still the directory FD holds, paths.remove_flat_directory)
 *   default SEVERITY ERRNO | staged NR | name NR NAME | reported SEVERITY NAME
 *   rule plain|steady NR SEVERITY ERRNO COUNT {INDEX OP VALUE MASK WIDTH32}*COUNT
 *   restart on-failure|always LIMIT INTERVAL DELAY MAX_DELAY RESTART_FD | restarted T
 *   | exec ARG (the command line to exec again, one argument per line) | stopping (a stop signal was
 *   passed on before the hand-over: no restart)
 * with severities 0 allow, 1 log, 2 errno, 3 trap, 4 kill_thread, 5 kill, and ops
 * eq ne lt le gt ge masked_eq. `jailer-monitor --decide STATE_FD NR ARG0..ARG5` prints the
 * answer for one call in the state's stage (for the tests that hold it to the Python policy).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Linux 6.6: wake the notifying task and the monitor on one CPU (a cross-CPU wake-up costs
 * more than the whole answer, above all in a VM); older kernels refuse it, which is fine. */
#ifndef SECCOMP_IOCTL_NOTIF_SET_FLAGS
#define SECCOMP_IOCTL_NOTIF_SET_FLAGS SECCOMP_IOW(4, __u64)
#endif
#ifndef SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP
#define SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP (1UL << 0)
#endif

enum { ALLOW, LOG, ERRNO, TRAP, KILL_THREAD, KILL };
enum { OP_EQ, OP_NE, OP_LT, OP_LE, OP_GT, OP_GE, OP_MASKED_EQ };
#define MAX_CONDITIONS 6
#define MAX_RULES 4096
#define MAX_LIST 64
#define NR_LIMIT 1024
#define EPERM_ERRNO 1
#define SIGSYS_NUMBER 31
#define MAX_RESTARTS 1024
#define MAX_ARGS 256

struct condition { int index, op, width32; uint64_t value, mask; };
struct rule { int steady, nr, severity, errnum, count; struct condition conditions[MAX_CONDITIONS]; };

static struct rule rules[MAX_RULES];
static int rule_count, default_severity = KILL, default_errno = -1;
static char *names[NR_LIMIT];
static unsigned char staged[NR_LIMIT];
static unsigned char reported[NR_LIMIT][KILL + 1];
static char *cgroups[MAX_LIST];
static struct made { int fd, dirfd; char *name; } made[MAX_LIST], tidy[MAX_LIST];
static int cgroup_count, made_count, tidy_count;
static pid_t program;
static int pidfd = -1, listener = -1, notify_fd = -1, status_fd = -1, killed, steady_stage, guard, staging;
static int restart_policy, restart_limit, restart_fd = -1, restart_count, stop_requested, arg_count;
static double restart_interval, restart_delay, restart_max_delay, restarts[MAX_RESTARTS];
static char *exec_args[MAX_ARGS + 1];
enum { RESTART_NO, RESTART_ON_FAILURE, RESTART_ALWAYS };

static void warn(const char *format, ...)
{
	char line[1024];
	va_list args;
	int n = snprintf(line, sizeof line, "jailer: ");
	va_start(args, format);
	n += vsnprintf(line + n, sizeof line - n - 1, format, args);
	va_end(args);
	if (n > (int)sizeof line - 2)
		n = sizeof line - 2;
	line[n++] = '\n';
	if (write(2, line, n) < 0) { /* nothing left to tell */ }
}

/* One JSON line on the status fd; `body` holds the fields after "event". */
static void emit(const char *event, const char *body)
{
	char line[25000];   /* more than any body: a STATUS= text of 4096 bytes escapes to 24576 at most */
	int n;
	if (status_fd < 0)
		return;
	n = snprintf(line, sizeof line, "{\"event\":\"%s\"%s%s}\n", event, *body ? "," : "", body);
	if (n >= (int)sizeof line)
		return;
	if (write(status_fd, line, n) < 0) {
		warn("status fd %d: %s; no more status events", status_fd, strerror(errno));
		status_fd = -1;
	}
}

/* The length of the valid UTF-8 sequence at s (of `left` bytes), or 0. */
static size_t utf8_sequence(const unsigned char *s, size_t left)
{
	size_t length = s[0] < 0x80 ? 1 : s[0] >= 0xc2 && s[0] <= 0xdf ? 2 : s[0] >= 0xe0 && s[0] <= 0xef ? 3
		      : s[0] >= 0xf0 && s[0] <= 0xf4 ? 4 : 0;
	if (length == 0 || length > left)
		return 0;
	for (size_t i = 1; i < length; i++)
		if ((s[i] & 0xc0) != 0x80)
			return 0;
	if ((s[0] == 0xe0 && s[1] < 0xa0) || (s[0] == 0xed && s[1] >= 0xa0)   /* overlong, surrogate */
	    || (s[0] == 0xf0 && s[1] < 0x90) || (s[0] == 0xf4 && s[1] >= 0x90))   /* overlong, > U+10FFFF */
		return 0;
	return length;
}

/* A JSON string (quotes included) for text from the program, escaped like
 * jailer.status.encode_json, with invalid UTF-8 replaced by U+FFFD as the launcher's
 * decode(errors="replace") does: the status stream stays valid JSON whatever the program sends. */
static void json_string(char *out, size_t size, const char *text, size_t text_length)
{
	const unsigned char *p = (const unsigned char *)text, *end = p + text_length;
	size_t n = 0;
	out[n++] = '"';
	while (p < end && n + 8 < size) {
		size_t length = utf8_sequence(p, end - p);
		if (*p == '"' || *p == '\\') {
			out[n++] = '\\';
			out[n++] = *p++;
		} else if (*p < ' ' || *p == 0x7f) {
			n += snprintf(out + n, size - n, "\\u%04x", *p++);
		} else if (length == 0) {
			memcpy(out + n, "\xef\xbf\xbd", 3);
			n += 3;
			p++;
		} else {
			memcpy(out + n, p, length);
			n += length;
			p += length;
		}
	}
	out[n++] = '"';
	out[n] = 0;
}

static int severity_of(const char *word) { return atoi(word); }

static int op_of(const char *word)
{
	static const char *ops[] = { "eq", "ne", "lt", "le", "gt", "ge", "masked_eq" };
	for (int i = 0; i < 7; i++)
		if (!strcmp(word, ops[i]))
			return i;
	return -1;
}

static char *rest_of_line(char *line, int words)
{
	/* the text after the first `words` space-separated words (a path may hold spaces) */
	char *p = line;
	for (int i = 0; i < words && p; i++) {
		p = strchr(p, ' ');
		if (p)
			p++;
	}
	return p ? strdup(p) : NULL;
}

/* A copy of a syscall name in one static pool rather than a malloc each (~370 of them, read
   while the program may wait for the monitor's first answer). NULL once it is full. */
static char *pooled(const char *name)
{
	static char pool[16384];
	static size_t used;
	size_t length = strlen(name) + 1;
	if (length > sizeof pool - used)
		return NULL;
	memcpy(pool + used, name, length);
	used += length;
	return pool + used - length;
}

static int load_state(int fd)
{
	static char buffer[65536];   /* the whole state (~9 KB) in one read, not musl's 1 KB at a time */
	FILE *file = fdopen(fd, "r");
	char line[8192];
	if (!file)
		return -1;
	setvbuf(file, buffer, _IOFBF, sizeof buffer);
	while (fgets(line, sizeof line, file)) {
		char key[16], word[64];
		long a, b;
		size_t key_length;
		line[strcspn(line, "\n")] = 0;
		key_length = strcspn(line, " ");
		if (key_length == 0 || key_length >= sizeof key)
			continue;
		memcpy(key, line, key_length);   /* (no sscanf here: the state has a line per syscall name, */
		key[key_length] = 0;             /* and the program waits for the monitor to have read them) */
		if (!strcmp(key, "name")) {
			char *number = line + key_length, *end;
			long nr = strtol(number, &end, 10);
			if (end != number && *end == ' ' && nr >= 0 && nr < NR_LIMIT && strlen(end + 1) < sizeof word
			    && end[1] && !strchr(end + 1, ' '))
				names[nr] = pooled(end + 1);
		} else if (!strcmp(key, "pid") && sscanf(line, "%*s %ld", &a) == 1) program = a;
		else if (!strcmp(key, "pidfd") && sscanf(line, "%*s %ld", &a) == 1) pidfd = a;
		else if (!strcmp(key, "listener") && sscanf(line, "%*s %ld", &a) == 1) listener = a;
		else if (!strcmp(key, "notify") && sscanf(line, "%*s %ld", &a) == 1) notify_fd = a;
		else if (!strcmp(key, "status") && sscanf(line, "%*s %ld", &a) == 1) status_fd = a;
		else if (!strcmp(key, "stage") && sscanf(line, "%*s %63s", word) == 1) steady_stage = !strcmp(word, "steady");
		else if (!strcmp(key, "guard") && sscanf(line, "%*s %ld", &a) == 1) guard = a;
		else if (!strcmp(key, "staging") && sscanf(line, "%*s %ld", &a) == 1) staging = a;
		else if (!strcmp(key, "cgroup") && cgroup_count < MAX_LIST) cgroups[cgroup_count++] = rest_of_line(line, 1);
		else if (!strcmp(key, "made") && made_count < MAX_LIST && sscanf(line, "%*s %ld %ld", &a, &b) == 2) {
			made[made_count].fd = a;
			made[made_count].dirfd = b;
			made[made_count++].name = rest_of_line(line, 3);
		} else if (!strcmp(key, "tidy") && tidy_count < MAX_LIST && sscanf(line, "%*s %ld %ld", &a, &b) == 2) {
			tidy[tidy_count].fd = a;
			tidy[tidy_count].dirfd = b;
			tidy[tidy_count++].name = rest_of_line(line, 3);
		} else if (!strcmp(key, "default") && sscanf(line, "%*s %ld %ld", &a, &b) == 2) {
			default_severity = a;
			default_errno = b;
		} else if (!strcmp(key, "staged") && sscanf(line, "%*s %ld", &a) == 1 && a >= 0 && a < NR_LIMIT) {
			staged[a] = 1;
		} else if (!strcmp(key, "reported") && sscanf(line, "%*s %ld %63s", &a, word) == 2) {
			for (int nr = 0; nr < NR_LIMIT; nr++)
				if (names[nr] && !strcmp(names[nr], word) && a >= 0 && a <= KILL)
					reported[nr][a] = 1;
		} else if (!strcmp(key, "restart") && sscanf(line, "%*s %63s %d %lf %lf %lf %d", word, &restart_limit,
							       &restart_interval, &restart_delay, &restart_max_delay,
							       &restart_fd) == 6) {
			restart_policy = !strcmp(word, "always") ? RESTART_ALWAYS
				       : !strcmp(word, "on-failure") ? RESTART_ON_FAILURE : RESTART_NO;
		} else if (!strcmp(key, "restarted") && restart_count < MAX_RESTARTS
			   && sscanf(line, "%*s %lf", &restarts[restart_count]) == 1) {
			restart_count++;
		} else if (!strcmp(key, "stopping")) {
			stop_requested = 1;
		} else if (!strcmp(key, "exec") && arg_count < MAX_ARGS) {
			exec_args[arg_count++] = rest_of_line(line, 1);
		} else if (!strcmp(key, "rule") && rule_count < MAX_RULES) {
			struct rule *r = &rules[rule_count];
			char stage[8], *p;
			int used;
			if (sscanf(line, "%*s %7s %d %15s %d %d%n", stage, &r->nr, word, &r->errnum, &r->count, &used) != 5
			    || r->count < 0 || r->count > MAX_CONDITIONS)
				return -1;
			r->steady = !strcmp(stage, "steady");
			r->severity = severity_of(word);
			p = line + used;
			for (int i = 0; i < r->count; i++) {
				struct condition *c = &r->conditions[i];
				char op[16];
				unsigned long long value, mask;
				if (sscanf(p, " %d %15s %llu %llu %d%n", &c->index, op, &value, &mask, &c->width32, &used) != 5
				    || (c->op = op_of(op)) < 0 || c->index < 0 || c->index > 5)
					return -1;
				c->value = value;
				c->mask = mask;
				p += used;
			}
			rule_count++;
		}
	}
	fclose(file);
	return program > 0 ? 0 : -1;
}

/* jailer.layers.seccomp._condition_holds: 32-bit arguments compare their low 32 bits. */
static int holds(const struct condition *c, uint64_t value)
{
	uint64_t target = c->value, mask = c->mask;
	if (c->width32) {
		value &= 0xffffffffu;
		target &= 0xffffffffu;
		mask &= 0xffffffffu;
	}
	switch (c->op) {
	case OP_EQ: return value == target;
	case OP_NE: return value != target;
	case OP_LT: return value < target;
	case OP_LE: return value <= target;
	case OP_GT: return value > target;
	case OP_GE: return value >= target;
	default: return (value & mask) == target;
	}
}

/* The most severe matching rule of one kind, or NULL. */
static const struct rule *most_severe(int steady, int nr, const uint64_t *args)
{
	const struct rule *best = NULL;
	for (int i = 0; i < rule_count; i++) {
		const struct rule *r = &rules[i];
		int all = 1;
		if (r->steady != steady || r->nr != nr)
			continue;
		for (int j = 0; j < r->count && all; j++)
			all = holds(&r->conditions[j], args[r->conditions[j].index]);
		if (all && (!best || r->severity > best->severity))
			best = r;
	}
	return best;
}

/* jailer.layers.seccomp.StagedPolicy.decide in the current stage: 0 continue, else -errno or KILL. */
static int decide(int nr, const uint64_t *args, int *severity)
{
	const struct rule *plain = most_severe(0, nr, args), *steady = steady_stage ? most_severe(1, nr, args) : NULL;
	int action = plain ? plain->severity : default_severity;
	int errnum = plain ? plain->errnum : default_errno;
	if (steady && steady->severity > action) {
		action = steady->severity;
		errnum = steady->errnum;
	}
	*severity = action;
	if (action == ALLOW || action == LOG) {
		if (nr >= 0 && nr < NR_LIMIT && staged[nr])
			return 0;
		*severity = ERRNO;
		return -EPERM_ERRNO;
	}
	if (action == ERRNO)
		return -(errnum < 0 ? EPERM_ERRNO : errnum);
	*severity = KILL;
	return KILL;
}

static int read_notify(void);

static void kill_program(pid_t caller)
{
	kill(program, SIGKILL);
	if (caller > 0 && caller != program)
		kill(caller, SIGKILL);
}

/* A failure means the caller was interrupted or killed meanwhile: nothing left to answer. */
static void answer(uint64_t id, int error, uint32_t flags)
{
	struct seccomp_notif_resp response = { .id = id, .error = error, .flags = flags };
	if (ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, &response) < 0)
		return;
}

static void notification(void)
{
	struct seccomp_notif notif;
	uint64_t args[6];
	char name[80], body[512], quoted[160];
	const char *stage, *when;
	int severity, result;
	if (!steady_stage && notify_fd >= 0)
		read_notify();   /* a READY=1 sent before this syscall counts before it is answered */
	memset(&notif, 0, sizeof notif);   /* the kernel refuses a buffer that is not zeroed */
	if (ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, &notif) < 0)
		return;
	stage = steady_stage ? "steady" : "setup";
	when = steady_stage && staging ? " after it was ready" : "";
	if (notif.data.nr >= 0 && notif.data.nr < NR_LIMIT && names[notif.data.nr])
		snprintf(name, sizeof name, "%s", names[notif.data.nr]);
	else
		snprintf(name, sizeof name, "syscall %d", notif.data.nr);
	for (int i = 0; i < 6; i++)
		args[i] = notif.data.args[i];
	result = decide(notif.data.nr, args, &severity);
	if (result == 0) {
		answer(notif.id, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE);
		return;
	}
	json_string(quoted, sizeof quoted, name, strlen(name));
	if (result == KILL) {
		if (ioctl(listener, SECCOMP_IOCTL_NOTIF_ID_VALID, &notif.id) == 0) {
			killed = 1;
			kill_program(notif.pid);
		}
		answer(notif.id, -EPERM_ERRNO, 0);
		snprintf(body, sizeof body, "\"syscall\":%s,\"nr\":%d,\"action\":\"kill\",\"pid\":%u,\"stage\":\"%s\"",
			 quoted, notif.data.nr, notif.pid, stage);
	} else {
		answer(notif.id, result, 0);
		snprintf(body, sizeof body,
			 "\"syscall\":%s,\"nr\":%d,\"action\":\"errno\",\"errno\":%d,\"pid\":%u,\"stage\":\"%s\"",
			 quoted, notif.data.nr, -result, notif.pid, stage);
	}
	emit("seccomp", body);
	if (notif.data.nr >= 0 && notif.data.nr < NR_LIMIT) {
		if (reported[notif.data.nr][severity])
			return;
		reported[notif.data.nr][severity] = 1;
	}
	if (result == KILL)
		warn("seccomp: the program called %s%s, refused by action 'kill': sandbox killed", name, when);
	else
		warn("seccomp: the program called %s%s, refused by action 'errno': failed with errno %d", name, when,
		     -result);
}

static void tell_service_manager(const char *state, size_t state_length)
{
	const char *address = getenv("NOTIFY_SOCKET");
	struct sockaddr_un target = { .sun_family = AF_UNIX };
	socklen_t length;
	int sock;
	if (!address || !*address)
		return;
	if ((address[0] != '/' && address[0] != '@') || strlen(address) >= sizeof target.sun_path) {
		warn("NOTIFY_SOCKET=%s is neither an absolute path nor an abstract '@name' socket", address);
		return;
	}
	memcpy(target.sun_path, address, strlen(address));
	if (address[0] == '@')
		target.sun_path[0] = 0;
	length = offsetof(struct sockaddr_un, sun_path) + strlen(address);
	sock = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (sock < 0 || sendto(sock, state, state_length, 0, (struct sockaddr *)&target, length) < 0)
		warn("cannot notify the service manager at %s: %s", address, strerror(errno));
	if (sock >= 0)
		close(sock);
}

static void become_ready(void)
{
	char body[64], state[64];
	if (steady_stage)
		return;
	steady_stage = 1;
	snprintf(body, sizeof body, "\"pid\":%d", (int)program);
	emit("ready", body);
	snprintf(state, sizeof state, "READY=1\nMAINPID=%d", (int)getpid());
	tell_service_manager(state, strlen(state));
	if (staging && listener >= 0)
		emit("stage", "\"stage\":\"steady\"");
}

/* The program's sd_notify-style datagrams; 0 once its end is gone. */
static int read_notify(void)
{
	char data[4096];
	for (;;) {
		ssize_t n = recv(notify_fd, data, sizeof data, MSG_DONTWAIT);
		if (n < 0)
			return errno == EAGAIN || errno == EINTR;
		if (n == 0)
			return 1;
		for (char *line = data, *end = data + n; line < end;) {   /* lines may hold NUL bytes */
			char *newline = memchr(line, '\n', end - line);
			size_t length = (newline ? newline : end) - line;
			if (length == 7 && !memcmp(line, "READY=1", 7)) {
				become_ready();
			} else if (length >= 7 && !memcmp(line, "STATUS=", 7)) {
				char body[24700];
				snprintf(body, sizeof body, "\"text\":");
				json_string(body + 7, sizeof body - 7, line + 7, length - 7);
				emit("status", body);
				tell_service_manager(line, length);
			}
			line += length + 1;
		}
	}
}

static void remove_made(const struct made *entry)
{
	struct stat there, ours;
	if (entry->name && fstatat(entry->dirfd, entry->name, &there, AT_SYMLINK_NOFOLLOW) == 0
	    && fstat(entry->fd, &ours) == 0 && there.st_dev == ours.st_dev && there.st_ino == ours.st_ino)
		unlinkat(entry->dirfd, entry->name, 0);
}

static void remove_flat_directory(const struct made *entry)
{
	struct stat there, ours;
	struct dirent *item;
	DIR *listing;
	int fd = openat(entry->dirfd, entry->name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return;
	if (fstat(fd, &there) < 0 || fstat(entry->fd, &ours) < 0 || there.st_dev != ours.st_dev
	    || there.st_ino != ours.st_ino || !(listing = fdopendir(fd))) {
		close(fd);
		return;
	}
	while ((item = readdir(listing)))
		if (strcmp(item->d_name, ".") && strcmp(item->d_name, ".."))
			unlinkat(fd, item->d_name, 0);
	closedir(listing);
	if (unlinkat(entry->dirfd, entry->name, AT_REMOVEDIR) < 0)
		warn("left the directory %s: the program made directories in it", entry->name);
}

/* jailer.layers.cgroups.Cgroup.remove: rmdir, killing what is left, for up to 2 s. */
static void remove_cgroups(void)
{
	struct timespec start, now, pause = { 0, 5 * 1000 * 1000 };
	clock_gettime(CLOCK_MONOTONIC, &start);
	for (int i = 0; i < cgroup_count; i++) {
		while (rmdir(cgroups[i]) < 0 && errno != ENOENT) {
			char procs[4200];
			FILE *file;
			long pid;
			clock_gettime(CLOCK_MONOTONIC, &now);
			if (now.tv_sec - start.tv_sec >= 2) {
				warn("could not remove cgroup %s: still busy", cgroups[i]);
				break;
			}
			snprintf(procs, sizeof procs, "%s/cgroup.procs", cgroups[i]);
			if ((file = fopen(procs, "re"))) {
				while (fscanf(file, "%ld", &pid) == 1)
					kill(pid, SIGKILL);
				fclose(file);
			}
			nanosleep(&pause, NULL);
		}
	}
}

static double monotonic_seconds(void)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return now.tv_sec + now.tv_nsec / 1e9;
}

/* The back-off: the signal that cancels it, or 0 once `seconds` have passed. */
static int wait_or_stop(int signal_fd, double seconds)
{
	double until = monotonic_seconds() + seconds;
	for (;;) {
		struct pollfd entry = { .fd = signal_fd, .events = POLLIN };
		struct signalfd_siginfo info;
		double left = until - monotonic_seconds();
		if (left <= 0)
			return 0;
		if (poll(&entry, 1, (int)(left * 1000) + 1) > 0 && read(signal_fd, &info, sizeof info) == sizeof info)
			return info.ssi_signo;
	}
}

/* jailer.host.restart.decide, then the back-off and the exec; returns (only when the program
 * is not restarted) the exit code to end with. */
static int restart(int wait_status, int signal_fd, int code)
{
	char body[128], number[32];
	double now = monotonic_seconds(), delay;
	int recent = 0, stop;
	if (stop_requested || (restart_policy == RESTART_ON_FAILURE && WIFEXITED(wait_status) && !WEXITSTATUS(wait_status)))
		return code;
	for (int i = 0; i < restart_count; i++)
		recent += now - restarts[i] < restart_interval;
	if (recent >= restart_limit) {
		snprintf(body, sizeof body, "\"restarts\":%d,\"interval\":%.9g", recent, restart_interval);
		emit("gave-up", body);
		warn("the program ended again after %d restarts within %g s (restart.limit = %d): not restarting it",
		     recent, restart_interval, restart_limit);
		return code;
	}
	delay = restart_delay;
	for (int i = 0; i < recent && delay < restart_max_delay; i++)
		delay *= 2;
	if (delay > restart_max_delay)
		delay = restart_max_delay;
	snprintf(body, sizeof body, "\"restart\":%d,\"delay\":%.9g", restart_count + 1, delay);
	emit("restarting", body);
	if ((stop = wait_or_stop(signal_fd, delay))) {
		snprintf(body, sizeof body, "\"signal\":%d", stop);
		emit("restart-cancelled", body);
		return 128 + stop;
	}
	if (arg_count == 0 || lseek(restart_fd, 0, SEEK_END) < 0 || dprintf(restart_fd, "restarted %.9g\n",
									     monotonic_seconds()) < 0) {
		warn("cannot restart the program: the launcher's restart state is unusable");
		return code;
	}
	snprintf(number, sizeof number, "%d", restart_fd);
	setenv("JAILER_RESTART_FD", number, 1);
	for (int i = 0; i < 3; i++) {   /* the ended program's descriptors do not go on; what jailer made does */
		int fd = (int[]){ pidfd, listener, notify_fd }[i];
		if (fd >= 0)
			close(fd);
	}
	execv(exec_args[0], exec_args);
	warn("cannot restart the program: %s: %s", exec_args[0], strerror(errno));
	return code;
}

static int finish(int wait_status, int signal_fd)
{
	char body[64];
	int code;
	if (notify_fd >= 0)
		read_notify();   /* what the program said before it ended */
	if (killed)
		wait_status = SIGSYS_NUMBER;   /* what the kernel's own kill action would have shown */
	if (WIFSIGNALED(wait_status)) {
		snprintf(body, sizeof body, "\"signal\":%d", WTERMSIG(wait_status));
		code = 128 + WTERMSIG(wait_status);
	} else {
		code = WEXITSTATUS(wait_status);
		snprintf(body, sizeof body, "\"code\":%d", code);
	}
	emit("exited", body);
	remove_cgroups();
	for (int i = 0; i < tidy_count; i++)
		remove_flat_directory(&tidy[i]);
	if (restart_policy != RESTART_NO)
		code = restart(wait_status, signal_fd, code);
	for (int i = 0; i < made_count; i++)
		remove_made(&made[i]);
	return code;
}

static int monitor(void)
{
	sigset_t forwarded;
	struct pollfd fds[4];
	int signal_fd;
	sigemptyset(&forwarded);
	sigaddset(&forwarded, SIGTERM);
	sigaddset(&forwarded, SIGINT);
	sigaddset(&forwarded, SIGHUP);
	sigprocmask(SIG_BLOCK, &forwarded, NULL);   /* the launcher blocked them before the exec */
	signal(SIGPIPE, SIG_IGN);
	signal_fd = signalfd(-1, &forwarded, SFD_CLOEXEC | SFD_NONBLOCK);
	if (signal_fd < 0) {
		warn("monitor: signalfd: %s", strerror(errno));
		return 125;
	}
	if (listener >= 0)
		ioctl(listener, SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP);
	fds[0] = (struct pollfd){ .fd = pidfd, .events = POLLIN };
	fds[1] = (struct pollfd){ .fd = signal_fd, .events = POLLIN };
	fds[2] = (struct pollfd){ .fd = listener, .events = POLLIN };
	fds[3] = (struct pollfd){ .fd = notify_fd, .events = POLLIN };
	for (;;) {
		if (poll(fds, 4, -1) < 0) {
			if (errno == EINTR)
				continue;
			warn("monitor: poll: %s", strerror(errno));
			return 125;
		}
		if (fds[3].revents) {
			if (!read_notify() || fds[3].revents & (POLLHUP | POLLERR))
				fds[3].fd = -1;
		}
		if (fds[2].revents) {
			if (fds[2].revents & (POLLHUP | POLLERR))
				fds[2].fd = -1;
			else
				notification();
		}
		if (fds[1].revents) {
			struct signalfd_siginfo info;
			while (read(signal_fd, &info, sizeof info) == sizeof info) {
				stop_requested = 1;
				if (guard && !steady_stage)
					kill_program(0);   /* a pid 1 without its handler yet would ignore it */
				else
					kill(program, info.ssi_signo);
			}
		}
		if (fds[0].revents) {
			int wait_status;
			while (waitpid(program, &wait_status, 0) < 0)
				if (errno != EINTR) {
					warn("monitor: waitpid: %s", strerror(errno));
					return 125;
				}
			return finish(wait_status, signal_fd);
		}
	}
}

int main(int argc, char **argv)
{
	if (argc == 10 && !strcmp(argv[1], "--decide")) {
		uint64_t args[6];
		int severity, result;
		if (load_state(atoi(argv[2])) < 0)
			return 2;
		for (int i = 0; i < 6; i++)
			args[i] = strtoull(argv[4 + i], NULL, 0);
		result = decide(atoi(argv[3]), args, &severity);
		if (result == 0)
			printf("continue\n");
		else if (result == KILL)
			printf("kill\n");
		else
			printf("errno %d\n", -result);
		return 0;
	}
	if (argc != 2) {
		fprintf(stderr, "usage: jailer-monitor STATE_FD (started by jailer run, not by hand)\n");
		return 2;
	}
	if (load_state(atoi(argv[1])) < 0) {
		warn("monitor: the launcher's state is unreadable");
		if (program > 0)
			kill(program, SIGKILL);
		return 125;
	}
	return monitor();
}
