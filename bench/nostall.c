/* LD_PRELOAD shim for the benchmark only: OpenDKIM without its two TCP stalls.
 *
 * libmilter sets no TCP_NODELAY, and OpenDKIM asks Postfix to skip the DATA step, so through
 * Postfix each message waits about 40 ms twice on delayed ACKs (docs/benchmarks.md). That makes
 * OpenDKIM's end-to-end rate a measure of those waits, not of its work. Loaded into OpenDKIM,
 * this sets TCP_NODELAY on every accepted connection and TCP_QUICKACK after every read (Linux
 * clears it again by itself), so neither side waits on a delayed ACK and OpenDKIM's end-to-end
 * rate shows what its CPU allows: the comparison for a milter that does not stall.
 *
 * Built by bench/run.py with the C compiler `make test` installs; never part of the product.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

static void set_flag(int fd, int option)
{
    int one = 1, saved = errno;  /* not a socket (a key file): ENOTSOCK, errno kept */

    setsockopt(fd, IPPROTO_TCP, option, &one, sizeof one);
    errno = saved;
}

static int tuned(int fd)
{
    if (fd >= 0) {
        set_flag(fd, TCP_NODELAY);
        set_flag(fd, TCP_QUICKACK);
    }
    return fd;
}

int accept(int s, struct sockaddr *addr, socklen_t *len)
{
    static int (*real)(int, struct sockaddr *, socklen_t *);

    if (!real)
        real = (int (*)(int, struct sockaddr *, socklen_t *))dlsym(RTLD_NEXT, "accept");
    return tuned(real(s, addr, len));
}

int accept4(int s, struct sockaddr *addr, socklen_t *len, int flags)
{
    static int (*real)(int, struct sockaddr *, socklen_t *, int);

    if (!real)
        real = (int (*)(int, struct sockaddr *, socklen_t *, int))dlsym(RTLD_NEXT, "accept4");
    return tuned(real(s, addr, len, flags));
}

ssize_t read(int fd, void *buf, size_t n)
{
    static ssize_t (*real)(int, void *, size_t);
    ssize_t got;

    if (!real)
        real = (ssize_t (*)(int, void *, size_t))dlsym(RTLD_NEXT, "read");
    got = real(fd, buf, n);
    if (got > 0)
        set_flag(fd, TCP_QUICKACK);
    return got;
}

/* With _FORTIFY_SOURCE, a build may call this checked variant instead of read(). */
ssize_t __read_chk(int fd, void *buf, size_t n, size_t buflen)
{
    static ssize_t (*real)(int, void *, size_t, size_t);
    ssize_t got;

    if (!real)
        real = (ssize_t (*)(int, void *, size_t, size_t))dlsym(RTLD_NEXT, "__read_chk");
    got = real(fd, buf, n, buflen);
    if (got > 0)
        set_flag(fd, TCP_QUICKACK);
    return got;
}

ssize_t recv(int fd, void *buf, size_t n, int flags)
{
    static ssize_t (*real)(int, void *, size_t, int);
    ssize_t got;

    if (!real)
        real = (ssize_t (*)(int, void *, size_t, int))dlsym(RTLD_NEXT, "recv");
    got = real(fd, buf, n, flags);
    if (got > 0)
        set_flag(fd, TCP_QUICKACK);
    return got;
}
