/* udpflood: a UDP datagram generator and counter for tools/benchudp.py.
 *
 * iperf3 cannot be used there: its control connection is TCP, and trionet's user
 * stack carries only UDP and ICMP.  This sends and counts plain IPv4 UDP and needs
 * nothing else on the path.  Build with  cc -O2 -Wall -Wextra -o udpflood udpflood.c
 *
 *   udpflood send ADDR PORT PAYLOAD SECONDS [SOURCE]
 *       connect()s a UDP socket (bound to address SOURCE if given, any port) to
 *       ADDR:PORT and sends PAYLOAD-byte datagrams with
 *       sendmmsg() (batches of 64) as fast as the kernel takes them, for SECONDS.
 *       A full send buffer blocks the sender (at most 1 s, SO_SNDTIMEO), which is
 *       how a tap that is read too slowly pushes back.  Errors (ECONNREFUSED from
 *       an ICMP port unreachable, ENOBUFS, ...) are counted and sending goes on.
 *       Prints one JSON line: {"sent": N, "errors": N, "seconds": S}
 *
 *   udpflood recv ADDR PORT WARMUP WINDOW START_TIMEOUT
 *       binds ADDR:PORT (receive buffer 4 MiB), prints "ready" once bound, waits up
 *       to START_TIMEOUT seconds for the first datagram, then counts every datagram
 *       (recvmmsg, batches of 64).  The window starts WARMUP seconds after the first
 *       datagram and lasts WINDOW seconds; counting goes on after it until no
 *       datagram came for 0.5 s (or 10 s have passed), so that `received` can be
 *       set against the sender's `sent`.  Prints one JSON line:
 *       {"received": N, "bytes": N, "window_datagrams": N, "window_bytes": N,
 *        "window_seconds": S, "last_s": S, "socket_drops": N}
 *       where last_s is when the last datagram came, in seconds after the window
 *       started (below WINDOW: the traffic stopped inside the window), and
 *       socket_drops the datagrams the kernel dropped because this socket's receive
 *       buffer was full (SO_RXQ_OVFL, as of the last datagram received): above 0,
 *       the receiver itself could not keep up.
 *
 * Exit status 1 if nothing was sent / received, 2 for bad arguments.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAX_PAYLOAD 65507
#define RCVBUF (4 << 20)
#define DRAIN_IDLE 0.5
#define DRAIN_MAX 10.0

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void usage(void)
{
    fprintf(stderr, "usage: udpflood send ADDR PORT PAYLOAD SECONDS [SOURCE]\n"
                    "       udpflood recv ADDR PORT WARMUP WINDOW START_TIMEOUT\n");
    exit(2);
}

static struct sockaddr_in parse_addr(const char *addr, const char *port)
{
    struct sockaddr_in sa;
    long p = strtol(port, NULL, 10);
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons((unsigned short)p);
    if (p < 1 || p > 65535 || inet_pton(AF_INET, addr, &sa.sin_addr) != 1)
        usage();
    return sa;
}

static int do_send(struct sockaddr_in dst, const struct sockaddr_in *src, long payload,
                   double seconds)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        perror("udpflood: socket");
        return 1;
    }
    if (src != NULL && bind(fd, (const struct sockaddr *)src, sizeof(*src)) < 0) {
        perror("udpflood: bind");
        return 1;
    }
    struct timeval tv = {1, 0};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (connect(fd, (struct sockaddr *)&dst, sizeof(dst)) < 0) {
        perror("udpflood: connect");
        return 1;
    }
    char *buf = malloc((size_t)payload + 1);
    if (buf == NULL) {
        perror("udpflood: malloc");
        return 1;
    }
    memset(buf, 0x5a, (size_t)payload + 1);
    struct iovec iov = {buf, (size_t)payload};
    struct mmsghdr msgs[BATCH];
    memset(msgs, 0, sizeof(msgs));
    for (int i = 0; i < BATCH; i++) {
        msgs[i].msg_hdr.msg_iov = &iov;
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    unsigned long long sent = 0, errors = 0;
    int last_errno = 0;
    double start = now(), end = start + seconds, t = start;
    while (!stop && t < end) {
        int n = sendmmsg(fd, msgs, BATCH, 0);
        if (n > 0) {
            sent += (unsigned long long)n;
        } else if (n < 0 && errno != EINTR) {
            if (errno != EAGAIN)
                errors++;
            last_errno = errno;
        }
        t = now();
    }
    printf("{\"sent\": %llu, \"errors\": %llu, \"seconds\": %.6f}\n", sent, errors, t - start);
    fflush(stdout);
    if (errors)
        fprintf(stderr, "udpflood: %llu sends failed, last: %s\n", errors, strerror(last_errno));
    free(buf);
    close(fd);
    return sent > 0 ? 0 : 1;
}

static int do_recv(struct sockaddr_in bind_to, double warmup, double window, double start_timeout)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        perror("udpflood: socket");
        return 1;
    }
    int size = RCVBUF;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size)) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_RXQ_OVFL, &one, sizeof(one));
    if (bind(fd, (struct sockaddr *)&bind_to, sizeof(bind_to)) < 0) {
        perror("udpflood: bind");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);

    static char bufs[BATCH][2048];
    static char ctrl[BATCH][CMSG_SPACE(sizeof(uint32_t))];
    struct iovec iovs[BATCH];
    struct mmsghdr msgs[BATCH];
    memset(msgs, 0, sizeof(msgs));
    for (int i = 0; i < BATCH; i++) {
        iovs[i].iov_base = bufs[i];
        iovs[i].iov_len = sizeof(bufs[i]);
        msgs[i].msg_hdr.msg_iov = &iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    unsigned long long received = 0, bytes = 0, win_n = 0, win_bytes = 0, drops = 0;
    double t0 = now(), first = -1, ws = 0, we = 0, last = 0;
    while (!stop) {
        double t = now();
        double deadline;
        if (first < 0)
            deadline = t0 + start_timeout;
        else if (t < we)
            deadline = we + DRAIN_IDLE;
        else
            deadline = last + DRAIN_IDLE < we + DRAIN_MAX ? last + DRAIN_IDLE : we + DRAIN_MAX;
        if (first >= 0 && t >= we && t >= deadline)
            break;
        for (int i = 0; i < BATCH; i++) {
            msgs[i].msg_hdr.msg_control = ctrl[i];
            msgs[i].msg_hdr.msg_controllen = sizeof(ctrl[i]);
        }
        int n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n < 0) {
            if (errno != EAGAIN && errno != EINTR) {
                perror("udpflood: recvmmsg");
                break;
            }
            if (t >= deadline)
                break;
            struct pollfd pf = {fd, POLLIN, 0};
            int ms = (int)((deadline - t) * 1000) + 1;
            poll(&pf, 1, ms > 100 ? 100 : ms);
            continue;
        }
        t = now();
        if (first < 0) {
            first = t;
            ws = first + warmup;
            we = ws + window;
        }
        last = t;
        unsigned long long b = 0;
        for (int i = 0; i < n; i++)
            b += msgs[i].msg_len;
        struct msghdr *mh = &msgs[n - 1].msg_hdr;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(mh); c != NULL; c = CMSG_NXTHDR(mh, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SO_RXQ_OVFL) {
                uint32_t d;
                memcpy(&d, CMSG_DATA(c), sizeof(d));
                drops = d;
            }
        }
        received += (unsigned long long)n;
        bytes += b;
        if (t >= ws && t < we) {
            win_n += (unsigned long long)n;
            win_bytes += b;
        }
    }
    printf("{\"received\": %llu, \"bytes\": %llu, \"window_datagrams\": %llu, "
           "\"window_bytes\": %llu, \"window_seconds\": %.6f, \"last_s\": %.6f, "
           "\"socket_drops\": %llu}\n",
           received, bytes, win_n, win_bytes, window, first < 0 ? -1.0 : last - ws, drops);
    fflush(stdout);
    close(fd);
    if (first < 0)
        fprintf(stderr, "udpflood: no datagram within %.1f s\n", start_timeout);
    return received > 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    if ((argc == 6 || argc == 7) && strcmp(argv[1], "send") == 0) {
        long payload = strtol(argv[4], NULL, 10);
        double seconds = strtod(argv[5], NULL);
        if (payload < 1 || payload > MAX_PAYLOAD || !(seconds > 0))
            usage();
        struct sockaddr_in src;
        if (argc == 7) {
            src = parse_addr(argv[6], "1");
            src.sin_port = 0;
        }
        return do_send(parse_addr(argv[2], argv[3]), argc == 7 ? &src : NULL, payload, seconds);
    }
    if (argc == 7 && strcmp(argv[1], "recv") == 0) {
        double warmup = strtod(argv[4], NULL), window = strtod(argv[5], NULL);
        double start_timeout = strtod(argv[6], NULL);
        if (!(warmup >= 0) || !(window > 0) || !(start_timeout > 0))
            usage();
        return do_recv(parse_addr(argv[2], argv[3]), warmup, window, start_timeout);
    }
    usage();
    return 2;
}
