/*
 * A deliberately cheap load agent for the benchmarks: it dials the proxy,
 * registers (Agent Protocol v2 reverse connection), and answers every event
 * frame with a pre-encoded allow AgentResponse carrying the event's
 * correlation id.  Written in C so that the proxy, not the agents, is what
 * the benchmark measures.  Compiled by benchmarks/run.py with the system cc.
 *
 * Modes:
 *   serve  open N connections at once (a burst), register each, print one
 *          JSON line when all are registered, then answer events (and Ping)
 *          until SIGTERM/SIGINT; print a JSON line with CPU times on exit.
 *   churn  registration rate: keep K handshakes in flight, each on a new
 *          connection that is closed once its RegistrationResponse arrives,
 *          until TOTAL handshakes are done; print one JSON line and exit.
 *
 * Usage:
 *   agent (--unix PATH | --tcp HOST:PORT) [--mode serve|churn]
 *         [--connections N] [--agent-id ID] [--per-agent K]
 *         [--total M] [--parallel K] [--max-seconds S]
 *         [--events 1,2,3,4,5]   (supported_events sent on registration)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

enum { ST_FREE, ST_CONNECTING, ST_HANDSHAKE, ST_REGISTERED, ST_RETRY, ST_START };

typedef struct {
    int fd;
    int state;
    int index;
    unsigned char *rbuf;
    size_t rlen, rcap;
    unsigned char *wbuf;
    size_t wlen, wcap, woff;
    int want_out;
} conn_t;

static volatile sig_atomic_t stop_flag = 0;
static void on_signal(int sig) { (void)sig; stop_flag = 1; }

static struct sockaddr_storage peer_addr;
static socklen_t peer_len;
static int peer_family;
static int epfd;
static const char *agent_prefix = "bench";
static const char *supported_events = "1,2,3,4,5";
static int per_agent = 0;

static long long answered = 0, registered_ok = 0, registered_failed = 0;
static long long connect_retries = 0, closed_early = 0;
static int retry_waiting = 0; /* connections in ST_RETRY */
static int start_waiting = 0; /* connections in ST_START */
static char first_error[512] = "";

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    fprintf(stderr, "agent: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void ensure(unsigned char **buf, size_t *cap, size_t need) {
    if (need <= *cap) return;
    size_t n = *cap ? *cap : 4096;
    while (n < need) n *= 2;
    unsigned char *p = realloc(*buf, n);
    if (!p) die("realloc");
    *buf = p;
    *cap = n;
}

static void put_frame(conn_t *c, int type, const void *a, size_t alen,
                      const void *b, size_t blen, const void *d, size_t dlen) {
    size_t plen = alen + blen + dlen;
    ensure(&c->wbuf, &c->wcap, c->wlen + 5 + plen);
    unsigned char *p = c->wbuf + c->wlen;
    uint32_t len = htonl((uint32_t)(plen + 1));
    memcpy(p, &len, 4);
    p[4] = (unsigned char)type;
    p += 5;
    if (alen) { memcpy(p, a, alen); p += alen; }
    if (blen) { memcpy(p, b, blen); p += blen; }
    if (dlen) { memcpy(p, d, dlen); }
    c->wlen += 5 + plen;
}

static void set_events(conn_t *c, int out) {
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) die("epoll_ctl mod");
    c->want_out = out;
}

static void close_conn(conn_t *c) {
    if (c->fd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
    }
    c->fd = -1;
    c->state = ST_FREE;
    c->rlen = c->wlen = c->woff = 0;
}

/* Returns 0 on success, -1 if the connection had to be closed. */
static int flush(conn_t *c) {
    while (c->woff < c->wlen) {
        ssize_t n = write(c->fd, c->wbuf + c->woff, c->wlen - c->woff);
        if (n > 0) { c->woff += (size_t)n; continue; }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (!c->want_out) set_events(c, 1);
            return 0;
        }
        return -1;
    }
    c->wlen = c->woff = 0;
    if (c->want_out && c->state != ST_CONNECTING) set_events(c, 0);
    return 0;
}

static char agent_id_buf[128];
static const char *agent_id_for(int index) {
    if (per_agent <= 0) return agent_prefix;
    snprintf(agent_id_buf, sizeof agent_id_buf, "%s-%d", agent_prefix, index / per_agent);
    return agent_id_buf;
}

static void queue_registration(conn_t *c) {
    char payload[1024];
    const char *id = agent_id_for(c->index);
    int n = snprintf(payload, sizeof payload,
        "{\"protocol_version\":2,\"agent_id\":\"%s\",\"capabilities\":{\"agent_id\":\"%s\","
        "\"name\":\"bench agent\",\"version\":\"1.0.0\",\"supported_events\":[%s],"
        "\"features\":{\"streaming_body\":true,\"websocket\":false,\"guardrails\":false,"
        "\"config_push\":false,\"metrics_export\":false,\"concurrent_requests\":1000,"
        "\"cancellation\":true,\"flow_control\":true,\"health_reporting\":false},"
        "\"limits\":{\"max_body_size\":1048576,\"max_concurrency\":1000,"
        "\"preferred_chunk_size\":65536}},\"auth_token\":null,\"metadata\":{\"pid\":%d}}",
        id, id, supported_events, (int)getpid());
    put_frame(c, 0x01, payload, (size_t)n, NULL, 0, NULL, 0);
}

static const char ALLOW_HEAD[] =
    "{\"version\":2,\"decision\":\"allow\",\"request_headers\":[],\"response_headers\":[],"
    "\"routing_metadata\":{},\"audit\":{\"tags\":[],\"rule_ids\":[],\"confidence\":null,"
    "\"reason_codes\":[],\"custom\":{\"correlation_id\":\"";
static const char ALLOW_TAIL[] =
    "\"}},\"needs_more\":false,\"request_body_mutation\":null,"
    "\"response_body_mutation\":null,\"websocket_decision\":null}";

static void answer_event(conn_t *c, const unsigned char *payload, size_t plen) {
    static const char key[] = "\"correlation_id\":\"";
    const unsigned char *p = memmem(payload, plen, key, sizeof key - 1);
    if (!p) return;
    p += sizeof key - 1;
    const unsigned char *end = payload + plen;
    const unsigned char *q = p;
    while (q < end && *q != '"') q += (*q == '\\') ? 2 : 1;
    if (q > end) return;
    put_frame(c, 0x20, ALLOW_HEAD, sizeof ALLOW_HEAD - 1, p, (size_t)(q - p),
              ALLOW_TAIL, sizeof ALLOW_TAIL - 1);
    answered++;
}

static conn_t *conns;
static int nconns;

/* Mode-specific reactions to a HandshakeResponse and to a connection the
 * proxy closed; set by main. */
static void (*on_registered)(conn_t *c, int ok) = NULL;
static void (*on_closed)(conn_t *c, int state) = NULL;

static void handle_frame(conn_t *c, int type, const unsigned char *payload, size_t plen) {
    if (type == 0x02) {
        int ok = memmem(payload, plen, "\"success\":true", 14) != NULL;
        if (ok) {
            registered_ok++;
        } else {
            registered_failed++;
            if (!first_error[0]) {
                size_t n = plen < sizeof first_error - 1 ? plen : sizeof first_error - 1;
                for (size_t i = 0; i < n; i++)
                    first_error[i] = (payload[i] == '"' || payload[i] == '\\') ? '\'' : (char)payload[i];
                first_error[n] = 0;
            }
        }
        c->state = ok ? ST_REGISTERED : ST_FREE;
        on_registered(c, ok);
    } else if (type >= 0x10 && type <= 0x17) {
        answer_event(c, payload, plen);
    } else if (type == 0x41) {
        put_frame(c, 0x42, payload, plen, NULL, 0, NULL, 0);
    }
}

/* The proxy closed the connection (or it broke) before we did. */
static void lost(conn_t *c) {
    int state = c->state;
    if (state != ST_FREE) closed_early++;
    close_conn(c);
    if (on_closed) on_closed(c, state);
}

static void handle_readable(conn_t *c) {
    for (;;) {
        ensure(&c->rbuf, &c->rcap, c->rlen + 65536);
        ssize_t n = read(c->fd, c->rbuf + c->rlen, c->rcap - c->rlen);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        if (n <= 0) {
            lost(c);
            return;
        }
        c->rlen += (size_t)n;
        size_t off = 0;
        while (c->rlen - off >= 5) {
            uint32_t len;
            memcpy(&len, c->rbuf + off, 4);
            len = ntohl(len);
            if (len == 0 || c->rlen - off - 4 < len) break;
            int type = c->rbuf[off + 4];
            handle_frame(c, type, c->rbuf + off + 5, len - 1);
            off += 4 + len;
            if (c->fd < 0) return; /* closed by the mode handler */
        }
        if (off) {
            memmove(c->rbuf, c->rbuf + off, c->rlen - off);
            c->rlen -= off;
        }
        if ((size_t)n < 65536) break;
    }
    if (c->wlen && flush(c) < 0) lost(c);
}

/* Start connecting c; on EAGAIN/ECONNREFUSED (listen backlog full) the
 * connection is marked for a retry. */
static int start_connect(conn_t *c) {
    int fd = socket(peer_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    if (peer_family == AF_INET) {
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    c->fd = fd;
    c->rlen = c->wlen = c->woff = 0;
    int r = connect(fd, (struct sockaddr *)&peer_addr, peer_len);
    if (r < 0 && errno != EINPROGRESS) {
        if (errno == EAGAIN || errno == ECONNREFUSED) {
            close(fd);
            c->fd = -1;
            c->state = ST_RETRY;
            retry_waiting++;
            connect_retries++;
            return 1;
        }
        die("connect");
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl add");
    c->want_out = 1;
    c->state = ST_CONNECTING;
    return 0;
}

/* Start the connections waiting in ST_START, and those in ST_RETRY until
 * the listen backlog is full again. */
static void start_waiting_connections(void) {
    int full = 0;
    retry_waiting = start_waiting = 0;
    for (int i = 0; i < nconns; i++) {
        conn_t *c = &conns[i];
        if (c->state == ST_START || (c->state == ST_RETRY && !full)) {
            if (start_connect(c)) full = 1;
        } else if (c->state == ST_RETRY) {
            retry_waiting++;
        }
    }
}

static void handle_writable(conn_t *c) {
    if (c->state == ST_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
            close(c->fd);
            c->fd = -1;
            c->state = ST_RETRY;
            retry_waiting++;
            connect_retries++;
            return;
        }
        c->state = ST_HANDSHAKE;
        queue_registration(c);
    }
    if (flush(c) < 0) lost(c);
}

/* ---- modes ------------------------------------------------------------ */
static long long churn_total, churn_started, churn_done;
static double t_first, t_last;

static void serve_registered(conn_t *c, int ok) {
    (void)ok;
    t_last = now_s();
    if (!ok) close_conn(c);
}

static void churn_registered(conn_t *c, int ok) {
    (void)ok;
    churn_done++;
    t_last = now_s();
    close_conn(c);
    if (churn_started < churn_total) {
        /* Started from the main loop, not while c's buffer is being parsed. */
        c->index = (int)churn_started++;
        c->state = ST_START;
        start_waiting++;
    }
}

/* A connection closed before its RegistrationResponse was shed by the
 * proxy's cap on connections awaiting registration: dial again, as a real
 * agent would. */
static long long redialled = 0;
static void serve_closed(conn_t *c, int state) {
    if (state == ST_CONNECTING || state == ST_HANDSHAKE) {
        redialled++;
        c->state = ST_RETRY;
        retry_waiting++;
    }
}

static void churn_closed(conn_t *c, int state) {
    (void)state;
    if (churn_started < churn_total) {
        c->index = (int)churn_started++;
        c->state = ST_START;
        start_waiting++;
    }
}

static void print_cpu(const char *event, double elapsed) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("{\"event\":\"%s\",\"pid\":%d,\"answered\":%lld,\"registered\":%lld,"
           "\"failed\":%lld,\"closed_early\":%lld,\"connect_retries\":%lld,\"redialled\":%lld,"
           "\"seconds\":%.6f,\"cpu_user\":%.6f,\"cpu_sys\":%.6f,\"max_rss_kib\":%ld,"
           "\"first_error\":\"%s\"}\n",
           event, (int)getpid(), answered, registered_ok, registered_failed, closed_early,
           connect_retries, redialled, elapsed,
           ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6,
           ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6, ru.ru_maxrss, first_error);
    fflush(stdout);
}

static void parse_peer(const char *unix_path, const char *tcp) {
    memset(&peer_addr, 0, sizeof peer_addr);
    if (unix_path) {
        struct sockaddr_un *sun = (struct sockaddr_un *)&peer_addr;
        sun->sun_family = AF_UNIX;
        if (strlen(unix_path) >= sizeof sun->sun_path) { fprintf(stderr, "agent: path too long\n"); exit(2); }
        strcpy(sun->sun_path, unix_path);
        peer_len = sizeof *sun;
        peer_family = AF_UNIX;
    } else {
        char host[256];
        const char *colon = strrchr(tcp, ':');
        if (!colon || (size_t)(colon - tcp) >= sizeof host) { fprintf(stderr, "agent: bad --tcp\n"); exit(2); }
        memcpy(host, tcp, (size_t)(colon - tcp));
        host[colon - tcp] = 0;
        struct sockaddr_in *sin = (struct sockaddr_in *)&peer_addr;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)atoi(colon + 1));
        if (inet_pton(AF_INET, host, &sin->sin_addr) != 1) { fprintf(stderr, "agent: bad host\n"); exit(2); }
        peer_len = sizeof *sin;
        peer_family = AF_INET;
    }
}

int main(int argc, char **argv) {
    const char *unix_path = NULL, *tcp = NULL, *mode = "serve";
    int connections = 4, parallel = 64;
    double max_seconds = 120.0;
    churn_total = 1000;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) { fprintf(stderr, "agent: %s needs a value\n", a); return 2; }
        if (!strcmp(a, "--unix")) unix_path = v;
        else if (!strcmp(a, "--tcp")) tcp = v;
        else if (!strcmp(a, "--mode")) mode = v;
        else if (!strcmp(a, "--connections")) connections = atoi(v);
        else if (!strcmp(a, "--agent-id")) agent_prefix = v;
        else if (!strcmp(a, "--per-agent")) per_agent = atoi(v);
        else if (!strcmp(a, "--total")) churn_total = atoll(v);
        else if (!strcmp(a, "--parallel")) parallel = atoi(v);
        else if (!strcmp(a, "--max-seconds")) max_seconds = atof(v);
        else if (!strcmp(a, "--events")) supported_events = v;
        else { fprintf(stderr, "agent: unknown option %s\n", a); return 2; }
        i++;
    }
    if (!unix_path == !tcp) { fprintf(stderr, "agent: give one of --unix or --tcp\n"); return 2; }
    parse_peer(unix_path, tcp);

    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    signal(SIGPIPE, SIG_IGN);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");

    int churn = !strcmp(mode, "churn");
    if (!churn && strcmp(mode, "serve")) { fprintf(stderr, "agent: unknown mode %s\n", mode); return 2; }
    nconns = churn ? parallel : connections;
    if (churn && nconns > churn_total) nconns = (int)churn_total;
    conns = calloc((size_t)nconns, sizeof *conns);
    if (!conns) die("calloc");
    on_registered = churn ? churn_registered : serve_registered;
    on_closed = churn ? churn_closed : serve_closed;

    t_first = t_last = now_s();
    for (int i = 0; i < nconns; i++) {
        conns[i].fd = -1;
        conns[i].index = i;
        conns[i].state = ST_START;
    }
    start_waiting_connections();
    churn_started = nconns;

    int announced = 0;
    struct epoll_event events[512];
    while (!stop_flag) {
        int pending_retry = retry_waiting > 0;
        int n = epoll_wait(epfd, events, 512, pending_retry ? 1 : 200);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            conn_t *c = events[i].data.ptr;
            if (c->fd < 0) continue;
            if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                if (c->state == ST_CONNECTING && (events[i].events & EPOLLOUT))
                    handle_writable(c);
                if (c->fd >= 0) handle_readable(c);
            }
            if (c->fd >= 0 && (events[i].events & EPOLLOUT)) handle_writable(c);
        }
        if (pending_retry || start_waiting) start_waiting_connections();
        double elapsed = now_s() - t_first;
        if (churn) {
            if (churn_done + closed_early >= churn_total) break;
        } else if (!announced && registered_ok + registered_failed >= connections) {
            announced = 1;
            print_cpu("registered", t_last - t_first);
        }
        if ((churn || !announced) && elapsed > max_seconds) {
            fprintf(stderr, "agent: gave up after %.1f s\n", elapsed);
            break;
        }
    }
    print_cpu(churn ? "churn" : "exit", t_last - t_first);
    return 0;
}
