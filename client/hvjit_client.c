/*
 * hvjit-client: `hvjit run` through a warm `hvjit serve`, started in about a millisecond.
 *
 *     hvjit-client run [--server PATH] IMAGE [hvjit run options]
 *
 * The same request as hvjit/serve_client.py (whose docstring is the wire format): a 4-byte
 * big-endian length and a JSON object (argv, cwd, env, umask, process_start_ns) with this
 * process's stdin, stdout and stderr attached (SCM_RIGHTS); then JSON lines back: {"pid": N},
 * and {"status": S} or {"signal": N}. SIGINT and SIGTERM go on to the child running the
 * command; the exit status (or the signal) is the child's.
 *
 * The server: --server PATH, else $HVJIT_SERVER, else $XDG_RUNTIME_DIR/hvjit/serve.sock, else
 * serve.sock in hvjit's cache directory. If nobody listens on a socket named by --server, it
 * is an error; otherwise the run goes to `hvjit` itself, in its own process.
 *
 * Bytes that are not UTF-8 (in argv, the environment or the directory) travel as lone
 * surrogates U+DC80..U+DCFF, which Python's surrogateescape turns back into those bytes.
 */
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

#define MAX_REQUEST (1u << 20) /* the server's limit */

/* ---- a growing buffer with JSON string encoding ------------------------------------------- */

struct buf {
    char *data;
    size_t len, cap;
};

static void die_oom(void)
{
    fputs("hvjit-client: out of memory\n", stderr);
    exit(1);
}

static void put(struct buf *b, const void *data, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n)
            cap *= 2;
        char *grown = realloc(b->data, cap);
        if (!grown)
            die_oom();
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, n);
    b->len += n;
}

static void puts_(struct buf *b, const char *s)
{
    put(b, s, strlen(s));
}

static void printf_(struct buf *b, const char *fmt, ...)
{
    char tmp[64];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    put(b, tmp, (size_t)n);
}

/* Length of the well-formed UTF-8 sequence at s (at most n bytes), or 0. */
static size_t utf8_sequence(const unsigned char *s, size_t n)
{
    unsigned char c = s[0];
    size_t len;
    uint32_t cp;
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
        cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        cp = c & 0x07;
    } else {
        return 0;
    }
    if (n < len)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = cp << 6 | (s[i] & 0x3F);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0; /* overlong, out of range, or a surrogate: not UTF-8 */
    return len;
}

static void put_json_string(struct buf *b, const char *text, size_t n)
{
    const unsigned char *s = (const unsigned char *)text;
    puts_(b, "\"");
    for (size_t i = 0; i < n;) {
        unsigned char c = s[i];
        size_t len = utf8_sequence(s + i, n - i);
        if (len == 0) {
            printf_(b, "\\udc%02x", c); /* surrogateescape */
            i++;
        } else if (c == '"' || c == '\\') {
            printf_(b, "\\%c", c);
            i++;
        } else if (c < 0x20 || c == 0x7F) {
            printf_(b, "\\u%04x", c);
            i++;
        } else {
            put(b, s + i, len);
            i += len;
        }
    }
    puts_(b, "\"");
}

/* ---- the request ---------------------------------------------------------------------------- */

static int64_t monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void build_request(struct buf *b, char **argv, int argc, int64_t start_ns)
{
    b->len = 0;
    put(b, "\0\0\0\0", 4); /* the length, filled in below */
    puts_(b, "{\"argv\": [");
    for (int i = 0; i < argc; i++) {
        if (i)
            puts_(b, ", ");
        put_json_string(b, argv[i], strlen(argv[i]));
    }
    puts_(b, "], \"cwd\": ");
    char *cwd = getcwd(NULL, 0);
    if (!cwd) {
        perror("hvjit-client: getcwd");
        exit(1);
    }
    put_json_string(b, cwd, strlen(cwd));
    free(cwd);
    puts_(b, ", \"env\": {");
    int first = 1;
    for (char **e = environ; *e; e++) {
        const char *eq = strchr(*e, '=');
        if (!eq || eq == *e)
            continue;
        if (!first)
            puts_(b, ", ");
        first = 0;
        put_json_string(b, *e, (size_t)(eq - *e));
        puts_(b, ": ");
        put_json_string(b, eq + 1, strlen(eq + 1));
    }
    mode_t mask = umask(022);
    umask(mask);
    printf_(b, "}, \"umask\": %u, \"process_start_ns\": %lld}", (unsigned)mask, (long long)start_ns);
    uint32_t body = (uint32_t)(b->len - 4);
    unsigned char *p = (unsigned char *)b->data;
    p[0] = body >> 24, p[1] = body >> 16, p[2] = body >> 8, p[3] = body;
}

static int send_request(int sock, const struct buf *b)
{
    int fds[3] = {0, 1, 2};
    char control[CMSG_SPACE(sizeof fds)];
    memset(control, 0, sizeof control);
    struct iovec iov = {.iov_base = b->data, .iov_len = b->len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(cmsg), fds, sizeof fds);
    ssize_t sent;
    do
        sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    if (sent < 0)
        return -1;
    for (size_t off = (size_t)sent; off < b->len;) {
        ssize_t n = send(sock, b->data + off, b->len - off, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        off += (size_t)n;
    }
    return 0;
}

/* ---- signals: Ctrl-C reaches only this process; the child gets it from here ----------------- */

static volatile sig_atomic_t child_pid;
static volatile sig_atomic_t pending[2]; /* SIGINT, SIGTERM before the child's pid came */

static void forward(int signum)
{
    if (child_pid > 0)
        kill(child_pid, signum);
    else
        pending[signum == SIGTERM] = 1;
}

static void forward_pending(void)
{
    if (pending[0])
        kill(child_pid, SIGINT);
    if (pending[1])
        kill(child_pid, SIGTERM);
}

/* ---- the server's answer --------------------------------------------------------------------- */

/* The integer after "key": in a JSON line, or -1 when the key is not there. */
static long field(const char *line, const char *key)
{
    char quoted[32];
    snprintf(quoted, sizeof quoted, "\"%s\"", key);
    const char *at = strstr(line, quoted);
    if (!at)
        return -1;
    at += strlen(quoted);
    while (*at == ' ' || *at == ':')
        at++;
    return strtol(at, NULL, 10);
}

static int wait_for_status(int sock, const char *path)
{
    char line[4096];
    size_t len = 0;
    for (;;) {
        ssize_t n = read(sock, line + len, sizeof line - 1 - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        len += (size_t)n;
        line[len] = 0;
        char *end;
        while ((end = strchr(line, '\n'))) {
            *end = 0;
            long value;
            if ((value = field(line, "pid")) > 0) {
                child_pid = (sig_atomic_t)value;
                forward_pending();
            } else if ((value = field(line, "status")) >= 0) {
                return (int)value;
            } else if ((value = field(line, "signal")) > 0) {
                /* Die as the child did, so our parent sees what a direct run would show. */
                signal((int)value, SIG_DFL);
                raise((int)value);
                return 128 + (int)value;
            }
            len -= (size_t)(end + 1 - line);
            memmove(line, end + 1, len + 1);
        }
        if (len == sizeof line - 1)
            len = 0; /* a line longer than any the server sends: drop it */
    }
    fprintf(stderr, "hvjit: the server at %s closed the connection before the run ended\n", path);
    return 1;
}

/* ---- the socket ------------------------------------------------------------------------------- */

static char *default_socket(void)
{
    const char *runtime = getenv("XDG_RUNTIME_DIR");
    const char *cache = getenv("HVJIT_CACHE_DIR");
    char *path = NULL;
    int n;
    if (runtime && *runtime)
        n = asprintf(&path, "%s/hvjit/serve.sock", runtime);
    else if (cache && *cache)
        n = asprintf(&path, "%s/serve.sock", cache);
    else if (getenv("XDG_CACHE_HOME") && *getenv("XDG_CACHE_HOME"))
        n = asprintf(&path, "%s/hvjit/serve.sock", getenv("XDG_CACHE_HOME"));
    else
        n = asprintf(&path, "%s/.cache/hvjit/serve.sock", getenv("HOME") ? getenv("HOME") : "");
    if (n < 0)
        die_oom();
    return path;
}

static int connect_to(const char *path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(addr.sun_path, path);
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        return -1;
    if (connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0) {
        int e = errno;
        close(sock);
        errno = e;
        return -1;
    }
    return sock;
}

int main(int argc, char **argv)
{
    int64_t start_ns = monotonic_ns();
    if (argc < 2 || strcmp(argv[1], "run") != 0) {
        fputs("usage: hvjit-client run [--server PATH] IMAGE [hvjit run options]\n"
              "  `hvjit run` in a warm `hvjit serve` (--server, $HVJIT_SERVER or the default socket)\n",
              stderr);
        return 2;
    }
    /* argv for the server: "run" and the options, without --server PATH; none after "--". */
    char **rest = calloc((size_t)argc + 1, sizeof *rest);
    if (!rest)
        die_oom();
    const char *server = NULL;
    int nrest = 0, options = 1;
    rest[nrest++] = argv[1];
    for (int i = 2; i < argc; i++) {
        if (options && strcmp(argv[i], "--") == 0)
            options = 0;
        if (options && strcmp(argv[i], "--server") == 0 && i + 1 < argc) {
            server = argv[++i];
            continue;
        }
        if (options && strncmp(argv[i], "--server=", 9) == 0) {
            server = argv[i] + 9;
            continue;
        }
        rest[nrest++] = argv[i];
    }
    int explicit = server != NULL;
    if (!server)
        server = getenv("HVJIT_SERVER") && *getenv("HVJIT_SERVER") ? getenv("HVJIT_SERVER") : default_socket();

    int sock = connect_to(server);
    if (sock < 0) {
        if (explicit) {
            fprintf(stderr, "hvjit: error: no hvjit server at %s (%s)\n", server, strerror(errno));
            return 1;
        }
        fprintf(stderr, "hvjit: no hvjit server at %s (%s): running in this process\n", server, strerror(errno));
        char **direct = calloc((size_t)nrest + 2, sizeof *direct);
        if (!direct)
            die_oom();
        direct[0] = "hvjit";
        memcpy(direct + 1, rest, (size_t)nrest * sizeof *rest);
        unsetenv("HVJIT_SERVER"); /* it would only send the run back here */
        execvp("hvjit", direct);
        fprintf(stderr, "hvjit-client: cannot run hvjit: %s\n", strerror(errno));
        return 1;
    }

    struct sigaction sa = {.sa_handler = forward}; /* no SA_RESTART: reads see EINTR */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    struct buf request = {0};
    build_request(&request, rest, nrest, start_ns);
    if (request.len - 4 > MAX_REQUEST) {
        fprintf(stderr, "hvjit: error: the request (arguments and environment) is over %u bytes\n", MAX_REQUEST);
        return 1;
    }
    if (send_request(sock, &request) < 0) {
        fprintf(stderr, "hvjit: error: the server at %s: %s\n", server, strerror(errno));
        return 1;
    }
    int status = wait_for_status(sock, server);
    close(sock);
    return status;
}
