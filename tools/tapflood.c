/* tapflood: write Ethernet frames into a tap as fast as one thread can.
 *
 * The kernel's own ceiling for the tap receive path that trionet's tap backend
 * drives: one write() per frame into a queue fd, nothing else.  Used by
 * tools/benchtap.py; build with  cc -O2 -Wall -Wextra -o tapflood tapflood.c
 *
 *   tapflood [-v] [-m] IFNAME SIZE SECONDS
 *
 *   -v   IFF_VNET_HDR with a 12-byte virtio_net_hdr_v1 (all zero) before every
 *        frame, TUNSETVNETHDRSZ 12, TUNSETOFFLOAD 0 -- as trionet's queue fds
 *   -m   IFF_MULTI_QUEUE (must match how the tap was created)
 *   SIZE Ethernet frame length without vnet header or FCS, like testpmd --txpkts
 *
 * The fd is O_NONBLOCK like trionet's: the kernel only takes its cheaper
 * build_skb path for non-blocking writers, so a blocking fd would measure a
 * different (slower) path.  A write that would block waits in poll().
 *
 * The frame is the one DPDK testpmd's txonly mode sends from port 0: IPv4/UDP
 * 198.18.0.1:9 -> 198.18.0.2:9 to MAC 02:00:00:00:00:00, which is not the
 * tap's address, so the kernel counts it (tap rx_packets) and drops it early
 * in ip_rcv as PACKET_OTHERHOST.  Runs until SECONDS pass or SIGINT/SIGTERM,
 * then prints one line:  frames=N errors=N seconds=S pps=P
 * Exit status 1 if no frame could be written.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define VNET_HDR_LEN 12
#define MIN_FRAME 42 /* Ethernet + IPv4 + UDP headers */
#define MAX_FRAME 65535

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

static void put16(uint8_t *p, unsigned v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

/* Ethernet + IPv4 + UDP headers for a `size`-byte frame; payload left zero. */
static void build_frame(uint8_t *f, unsigned size)
{
    static const uint8_t dst[6] = {0x02, 0, 0, 0, 0, 0x00};
    static const uint8_t src[6] = {0x02, 0, 0, 0, 0, 0x01};
    uint8_t *ip = f + 14, *udp = ip + 20;
    uint32_t sum = 0;
    memcpy(f, dst, 6);
    memcpy(f + 6, src, 6);
    put16(f + 12, 0x0800);
    ip[0] = 0x45;
    put16(ip + 2, size - 14);
    ip[8] = 64;           /* TTL */
    ip[9] = 17;           /* UDP */
    memcpy(ip + 12, (const uint8_t[]){198, 18, 0, 1}, 4);
    memcpy(ip + 16, (const uint8_t[]){198, 18, 0, 2}, 4);
    for (int i = 0; i < 20; i += 2)
        sum += (uint32_t)(ip[i] << 8 | ip[i + 1]);
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    put16(ip + 10, ~sum & 0xffff);
    put16(udp, 9);
    put16(udp + 2, 9);
    put16(udp + 4, size - 34); /* UDP checksum 0: none */
}

static int open_tap(const char *name, int vnet, int multi)
{
    struct ifreq ifr;
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        perror("tapflood: open /dev/net/tun");
        return -1;
    }
    memset(&ifr, 0, sizeof(ifr));
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | (vnet ? IFF_VNET_HDR : 0) | (multi ? IFF_MULTI_QUEUE : 0);
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        fprintf(stderr, "tapflood: TUNSETIFF %s: %s\n", name, strerror(errno));
        close(fd);
        return -1;
    }
    int hdr = VNET_HDR_LEN;
    if (vnet && (ioctl(fd, TUNSETVNETHDRSZ, &hdr) < 0 || ioctl(fd, TUNSETOFFLOAD, 0UL) < 0)) {
        fprintf(stderr, "tapflood: vnet header setup on %s: %s\n", name, strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

static void usage(void)
{
    fprintf(stderr, "usage: tapflood [-v] [-m] IFNAME SIZE SECONDS\n");
    exit(2);
}

int main(int argc, char **argv)
{
    int vnet = 0, multi = 0, opt;
    while ((opt = getopt(argc, argv, "vm")) != -1) {
        if (opt == 'v')
            vnet = 1;
        else if (opt == 'm')
            multi = 1;
        else
            usage();
    }
    if (argc - optind != 3)
        usage();
    const char *ifname = argv[optind];
    long size = strtol(argv[optind + 1], NULL, 10);
    double seconds = strtod(argv[optind + 2], NULL);
    if (strlen(ifname) == 0 || strlen(ifname) >= IFNAMSIZ || size < MIN_FRAME ||
        size > MAX_FRAME || !(seconds > 0))
        usage();

    int fd = open_tap(ifname, vnet, multi);
    if (fd < 0)
        return 1;
    size_t len = (size_t)size + (vnet ? VNET_HDR_LEN : 0);
    uint8_t *buf = calloc(1, len);
    if (buf == NULL) {
        perror("tapflood: calloc");
        return 1;
    }
    build_frame(buf + (vnet ? VNET_HDR_LEN : 0), (unsigned)size);

    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    unsigned long long frames = 0, errors = 0;
    int last_errno = 0;
    double start = now(), end = start + seconds, t = start;
    while (!stop) {
        for (int i = 0; i < 256; i++) {
            ssize_t w = write(fd, buf, len);
            if (w == (ssize_t)len) {
                frames++;
            } else if (w < 0 && errno == EAGAIN) {
                struct pollfd pf = {fd, POLLOUT, 0};
                poll(&pf, 1, 100);
            } else {
                errors++;
                last_errno = errno;
            }
        }
        t = now();
        if (t >= end)
            break;
    }
    double elapsed = t - start;
    printf("frames=%llu errors=%llu seconds=%.3f pps=%.0f\n", frames, errors, elapsed,
           elapsed > 0 ? (double)frames / elapsed : 0.0);
    fflush(stdout);
    if (errors)
        fprintf(stderr, "tapflood: %llu writes failed, last: %s\n", errors, strerror(last_errno));
    close(fd);
    free(buf);
    return frames > 0 ? 0 : 1;
}
