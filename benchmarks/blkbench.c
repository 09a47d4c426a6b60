/* blkbench: a small block-device benchmark for the guest side of benchmarks/virtio_blk.py.
 *
 *     blkbench DEVICE MODE [--block BYTES] [--total BYTES | --seconds S] [--depth N] [--seed N]
 *
 * MODE
 *   seqread    read from offset 0 upwards, wrapping at the end of the device
 *   seqwrite   write the pattern below from offset 0 upwards, wrapping likewise
 *   randread   read blocks at random offsets (multiples of the block size) within the device
 *   verify     read from offset 0 upwards and check that every 4 KiB block holds the pattern
 *              (default: the whole device, once)
 *
 * Options (BYTES take a K, M or G suffix, powers of 1024)
 *   --block BYTES   size of each request: default 1M, 4K for randread; a multiple of the
 *                   device's logical block size, and of 4K for seqwrite and verify
 *   --total BYTES   stop issuing requests once this many bytes were issued
 *   --seconds S     stop issuing requests after S seconds (default 3; verify: the whole device)
 *   --depth N       requests kept in flight (default 1, at most 256)
 *   --seed N        seed of randread's offsets (default 1)
 *
 * Every request is O_DIRECT on DEVICE (a block device, or a regular file for a try on the
 * host), from buffers aligned to 4 KiB with posix_memalign, issued through Linux native AIO
 * (io_setup, io_submit, io_getevents, called with syscall(2): no libaio), keeping --depth
 * requests in flight: as soon as one completes the next is submitted. Once the limit is
 * reached no more are submitted, the ones in flight are waited for, and the time runs from
 * the first submission to the last completion (CLOCK_MONOTONIC). Writes are not flushed:
 * a write counts once the device has acknowledged it.
 *
 * The pattern (the same the harness fills the disk image with, so that the image reads
 * back as the pattern whatever this program wrote): the 4 KiB block at byte offset OFF
 * holds OFF as a little-endian 64-bit number, then the 8 bytes "BLKBENCH", then byte i
 * (16 <= i < 4096) is i % 256.
 *
 * Output: one line on stdout per run, for instance
 *     BLKBENCH mode=randread bs=4096 depth=16 bytes=52428800 ios=12800 seconds=3.000123 MBps=17.48 iops=4266.5 bad=0
 * where MBps is 10^6 bytes per second and bad the number of 4 KiB blocks verify found wrong.
 * Errors go to stderr as one line starting "blkbench: ". Exit status: 0 done, 1 an I/O error,
 * a short transfer or a block verify found wrong, 2 a usage error.
 *
 * Build: gcc -O2 -static -o blkbench blkbench.c
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PATTERN_BLOCK 4096
#define ALIGNMENT 4096
#define MAX_DEPTH 256
#define MAX_REPORTED_MISMATCHES 5

enum mode { SEQREAD, SEQWRITE, RANDREAD, VERIFY };
static const char *const MODE_NAMES[] = {"seqread", "seqwrite", "randread", "verify"};

static void die(int status, const char *format, ...)
{
    va_list args;
    va_start(args, format);
    fputs("blkbench: ", stderr);
    vfprintf(stderr, format, args);
    fputc('\n', stderr);
    va_end(args);
    exit(status);
}

static void usage(const char *why)
{
    die(2, "%s\nusage: blkbench DEVICE seqread|seqwrite|randread|verify [--block BYTES] "
           "[--total BYTES | --seconds S] [--depth N] [--seed N]", why);
}

static uint64_t parse_bytes(const char *option, const char *text)
{
    char *end;
    errno = 0;
    unsigned long long value = strtoull(text, &end, 10);
    if (errno || end == text || text[0] == '-')
        usage(option);
    uint64_t scale = 1;
    switch (*end) {
    case 'K': case 'k': scale = 1ULL << 10; end++; break;
    case 'M': case 'm': scale = 1ULL << 20; end++; break;
    case 'G': case 'g': scale = 1ULL << 30; end++; break;
    }
    if (*end != '\0' || value == 0 || value > UINT64_MAX / scale)
        usage(option);
    return value * scale;
}

static double now(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
        die(1, "clock_gettime: %s", strerror(errno));
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t xorshift(uint64_t *state)     /* xorshift64* */
{
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return *state * 0x2545F4914F6CDD1DULL;
}

static unsigned char template_block[PATTERN_BLOCK];

static void stamp(unsigned char *buffer, size_t length, uint64_t offset)
{
    for (size_t at = 0; at < length; at += PATTERN_BLOCK) {
        uint64_t value = offset + at;
        for (int i = 0; i < 8; i++)
            buffer[at + i] = (unsigned char)(value >> (8 * i));
    }
}

/* The number of 4 KiB blocks of buffer (read at offset) that do not hold the pattern. */
static uint64_t check(const unsigned char *buffer, size_t length, uint64_t offset, uint64_t reported)
{
    uint64_t bad = 0;
    for (size_t at = 0; at < length; at += PATTERN_BLOCK) {
        uint64_t value = 0;
        for (int i = 0; i < 8; i++)
            value |= (uint64_t)buffer[at + i] << (8 * i);
        if (value != offset + at || memcmp(buffer + at + 8, template_block + 8, PATTERN_BLOCK - 8) != 0) {
            if (reported + bad < MAX_REPORTED_MISMATCHES)
                fprintf(stderr, "blkbench: verify: block at offset %" PRIu64 " does not hold the pattern "
                        "(its first 8 bytes read %" PRIu64 ")\n", offset + at, value);
            bad++;
        }
    }
    return bad;
}

static long io_setup(unsigned nr, aio_context_t *context) { return syscall(SYS_io_setup, nr, context); }
static long io_destroy(aio_context_t context) { return syscall(SYS_io_destroy, context); }
static long io_submit(aio_context_t context, long nr, struct iocb **iocbs)
{
    return syscall(SYS_io_submit, context, nr, iocbs);
}
static long io_getevents(aio_context_t context, long min_nr, long nr, struct io_event *events)
{
    return syscall(SYS_io_getevents, context, min_nr, nr, events, NULL);
}

static void submit_all(aio_context_t context, struct iocb **pending, long count)
{
    while (count > 0) {
        long submitted = io_submit(context, count, pending);
        if (submitted < 0 && errno == EINTR)
            continue;
        if (submitted < 0)
            die(1, "io_submit: %s", strerror(errno));
        if (submitted == 0)
            die(1, "io_submit: no request accepted");
        pending += submitted;
        count -= submitted;
    }
}

/* One run's requests: which comes next, and whether there is one to issue any more. */
struct run {
    enum mode mode;
    int fd;
    uint64_t block, blocks, total, issued, next_block, state;
    double seconds, start;
    uint64_t *offsets;
    struct iocb *iocbs;
    unsigned char **buffers;
};

static int more(const struct run *run)
{
    return run->total ? run->issued < run->total : now() - run->start < run->seconds;
}

/* Slot's next request: the next block (sequential modes, wrapping at the end of the device) or
 * a random one (randread); a write's buffer gets the pattern of its offset. */
static struct iocb *prepare(struct run *run, long slot)
{
    uint64_t index = run->mode == RANDREAD ? xorshift(&run->state) % run->blocks
                                           : run->next_block++ % run->blocks;
    run->offsets[slot] = index * run->block;
    if (run->mode == SEQWRITE)
        stamp(run->buffers[slot], run->block, run->offsets[slot]);
    struct iocb *iocb = &run->iocbs[slot];
    memset(iocb, 0, sizeof *iocb);
    iocb->aio_data = (uint64_t)slot;
    iocb->aio_lio_opcode = run->mode == SEQWRITE ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
    iocb->aio_fildes = (uint32_t)run->fd;
    iocb->aio_buf = (uint64_t)(uintptr_t)run->buffers[slot];
    iocb->aio_nbytes = run->block;
    iocb->aio_offset = (int64_t)run->offsets[slot];
    run->issued += run->block;
    return iocb;
}

int main(int argc, char **argv)
{
    if (argc < 3)
        usage("a device and a mode are needed");
    const char *device = argv[1];
    enum mode mode;
    for (mode = SEQREAD; mode <= VERIFY; mode++)
        if (strcmp(argv[2], MODE_NAMES[mode]) == 0)
            break;
    if (mode > VERIFY)
        usage("unknown mode");

    uint64_t block = 0, total = 0, seed = 1;
    double seconds = 0;
    long depth = 1;
    for (int i = 3; i < argc; i++) {
        const char *option = argv[i];
        if (i + 1 >= argc)
            usage(option);
        const char *value = argv[++i];
        if (strcmp(option, "--block") == 0) {
            block = parse_bytes(option, value);
        } else if (strcmp(option, "--total") == 0) {
            total = parse_bytes(option, value);
        } else if (strcmp(option, "--seconds") == 0) {
            char *end;
            seconds = strtod(value, &end);
            if (end == value || *end != '\0' || !(seconds > 0))
                usage(option);
        } else if (strcmp(option, "--depth") == 0) {
            depth = (long)parse_bytes(option, value);
            if (depth > MAX_DEPTH)
                usage("--depth is at most 256");
        } else if (strcmp(option, "--seed") == 0) {
            seed = parse_bytes(option, value);
        } else {
            usage(option);
        }
    }
    if (total && seconds)
        usage("--total and --seconds exclude each other");
    if (!block)
        block = mode == RANDREAD ? 4096 : 1 << 20;
    if ((mode == SEQWRITE || mode == VERIFY) && block % PATTERN_BLOCK)
        usage("seqwrite and verify need a --block that is a multiple of 4K");

    int fd = open(device, (mode == SEQWRITE ? O_RDWR : O_RDONLY) | O_DIRECT | O_CLOEXEC);
    if (fd < 0)
        die(1, "open %s: %s", device, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0)
        die(1, "fstat %s: %s", device, strerror(errno));
    uint64_t size;
    int logical = 512;
    if (S_ISBLK(st.st_mode)) {
        if (ioctl(fd, BLKGETSIZE64, &size) != 0)
            die(1, "BLKGETSIZE64 %s: %s", device, strerror(errno));
        if (ioctl(fd, BLKSSZGET, &logical) != 0)
            die(1, "BLKSSZGET %s: %s", device, strerror(errno));
    } else if (S_ISREG(st.st_mode)) {
        size = (uint64_t)st.st_size;
    } else {
        die(1, "%s is neither a block device nor a regular file", device);
    }
    if (logical <= 0 || block % (uint64_t)logical)
        usage("--block must be a multiple of the device's logical block size");
    uint64_t blocks = size / block;        /* whole blocks in the device */
    if (blocks == 0)
        die(1, "%s (%" PRIu64 " bytes) is smaller than one block of %" PRIu64, device, size, block);
    if (mode == VERIFY && !total && !seconds)
        total = blocks * block;
    if (!total && !seconds)
        seconds = 3;

    for (int i = 0; i < PATTERN_BLOCK; i++)
        template_block[i] = (unsigned char)i;
    memcpy(template_block + 8, "BLKBENCH", 8);

    unsigned char *buffers[MAX_DEPTH];
    uint64_t offsets[MAX_DEPTH];
    struct iocb iocbs[MAX_DEPTH], *pending[MAX_DEPTH];
    struct io_event events[MAX_DEPTH];
    for (long slot = 0; slot < depth; slot++) {
        int error = posix_memalign((void **)&buffers[slot], ALIGNMENT, block);
        if (error)
            die(1, "posix_memalign of %" PRIu64 " bytes: %s", block, strerror(error));
        for (uint64_t at = 0; at < block; at += PATTERN_BLOCK)
            memcpy(buffers[slot] + at, template_block, block - at < PATTERN_BLOCK ? block - at : PATTERN_BLOCK);
    }
    aio_context_t context = 0;
    if (io_setup((unsigned)depth, &context) != 0)
        die(1, "io_setup(%ld): %s", depth, strerror(errno));

    struct run run = {.mode = mode, .fd = fd, .block = block, .blocks = blocks, .total = total,
                      .seconds = seconds, .state = seed ? seed : 1, .offsets = offsets, .iocbs = iocbs,
                      .buffers = buffers};
    uint64_t done = 0, ios = 0, bad = 0;
    long count = 0;
    run.start = now();
    for (long slot = 0; slot < depth && more(&run); slot++)
        pending[count++] = prepare(&run, slot);
    submit_all(context, pending, count);
    long in_flight = count;
    double end = run.start;

    while (in_flight > 0) {
        long got = io_getevents(context, 1, depth, events);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            die(1, "io_getevents: %s", strerror(errno));
        end = now();
        in_flight -= got;
        count = 0;
        for (long i = 0; i < got; i++) {
            uint64_t slot = events[i].data;
            if (slot >= (uint64_t)depth)
                die(1, "io_getevents: a completion of an unknown request (%" PRIu64 ")", slot);
            const char *what = mode == SEQWRITE ? "write" : "read";
            int64_t result = events[i].res;
            if (result < 0)
                die(1, "%s of %" PRIu64 " bytes at offset %" PRIu64 ": %s", what, block, offsets[slot],
                    strerror((int)-result));
            if ((uint64_t)result != block)
                die(1, "short %s at offset %" PRIu64 ": %" PRId64 " of %" PRIu64 " bytes", what,
                    offsets[slot], result, block);
            done += block;
            ios++;
            if (mode == VERIFY)
                bad += check(buffers[slot], block, offsets[slot], bad);
            if (more(&run))
                pending[count++] = prepare(&run, (long)slot);
        }
        submit_all(context, pending, count);
        in_flight += count;
    }
    if (io_destroy(context) != 0)
        die(1, "io_destroy: %s", strerror(errno));
    if (close(fd) != 0)
        die(1, "close %s: %s", device, strerror(errno));

    double elapsed = end - run.start;
    if (elapsed <= 0)
        elapsed = 1e-9;
    if (printf("BLKBENCH mode=%s bs=%" PRIu64 " depth=%ld bytes=%" PRIu64 " ios=%" PRIu64 " seconds=%.6f "
               "MBps=%.2f iops=%.1f bad=%" PRIu64 "\n", MODE_NAMES[mode], block, depth, done, ios, elapsed,
               done / elapsed / 1e6, ios / elapsed, bad) < 0 || fflush(stdout) != 0)
        die(1, "writing the result: %s", strerror(errno));
    if (bad)
        die(1, "verify: %" PRIu64 " of %" PRIu64 " blocks of 4 KiB do not hold the pattern", bad,
            done / PATTERN_BLOCK);
    return 0;
}
