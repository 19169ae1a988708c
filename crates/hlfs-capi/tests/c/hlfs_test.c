/*
 * libhlfs from C: a volume written and read through the C API, checked
 * against a plain model of the disk, then written out as a raw image for
 * the hlfs command line to compare with.
 *
 * Usage: hlfs_test VOLUME EXPECTED_IMAGE [ROUNDS]
 *   VOLUME          a volume address that does not exist yet
 *   EXPECTED_IMAGE  where to write what the volume must hold at the end
 *   ROUNDS          writes per thread in the 8-thread part (default 200)
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hlfs.h"

#define SIZE (16u << 20)
#define THREADS 8
#define REGION (1u << 20)

static unsigned char *model;
static HLFS_CTRL *ctrl;
static int rounds = 200;

#define CHECK(cond, ...)                                                     \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "%s:%d: failed: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                    \
            fprintf(stderr, "\n");                                           \
            exit(1);                                                         \
        }                                                                    \
    } while (0)

/* Deterministic bytes for a write, different per seed. */
static void fill(unsigned char *buf, size_t len, uint32_t seed) {
    uint32_t x = seed * 2654435761u + 1;
    for (size_t i = 0; i < len; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        buf[i] = (unsigned char)(x | 1);
    }
}

static const char *why(HLFS_CTRL *c) {
    static __thread char text[512];
    hlfs_last_error(c, text, sizeof text);
    return text;
}

/* Writes through the API and into the model. */
static void put(uint64_t pos, uint32_t len, uint32_t seed) {
    unsigned char *buf = malloc(len);
    fill(buf, len, seed);
    int n = hlfs_write(ctrl, (const char *)buf, len, pos);
    CHECK(n == (int)len, "write %u at %llu: %d (%s)", len, (unsigned long long)pos, n, why(ctrl));
    memcpy(model + pos, buf, len);
    free(buf);
}

/* Reads through `c` and compares with `expected`. */
static void expect(HLFS_CTRL *c, const unsigned char *expected, uint64_t pos, uint32_t len) {
    unsigned char *buf = malloc(len);
    int n = hlfs_read(c, (char *)buf, len, pos);
    CHECK(n == (int)len, "read %u at %llu: %d (%s)", len, (unsigned long long)pos, n, why(c));
    CHECK(memcmp(buf, expected + pos, len) == 0, "bytes at %llu+%u differ", (unsigned long long)pos, len);
    free(buf);
}

/* Each thread writes and reads back its own region, unaligned, many times. */
static void *hammer(void *arg) {
    uint32_t t = (uint32_t)(uintptr_t)arg;
    uint64_t base = 8u * REGION + t * REGION;
    uint32_t x = t + 1;
    for (int i = 0; i < rounds; i++) {
        x = x * 1103515245u + 12345u;
        uint32_t len = 1 + (x >> 8) % 20000;
        uint64_t pos = base + (x >> 3) % (REGION - len);
        put(pos, len, t * 100000 + i);
        expect(ctrl, model, pos, len);
        if (i % 16 == 0) {
            CHECK(hlfs_flush(ctrl) == 0, "flush: %s", why(ctrl));
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    CHECK(argc >= 3, "usage: %s VOLUME EXPECTED_IMAGE [ROUNDS]", argv[0]);
    const char *volume = argv[1];
    if (argc > 3) {
        rounds = atoi(argv[3]);
    }
    printf("libhlfs %s\n", hlfs_version());
    model = calloc(SIZE, 1);

    /* A volume that does not exist is an error, with words. */
    char missing[4096];
    snprintf(missing, sizeof missing, "%s-missing", volume);
    HLFS_CTRL *none = init_hlfs(missing);
    CHECK(none != NULL, "init_hlfs: errno %d", errno);
    int rc = hlfs_open(none, HLFS_RDONLY);
    CHECK(rc == -ENOENT, "open of a missing volume: %d", rc);
    CHECK(strlen(why(none)) > 0, "no reason given");
    CHECK(strcmp(hlfs_strerror(rc), "no such volume or snapshot") == 0, "%s", hlfs_strerror(rc));
    CHECK(deinit_hlfs(none) == 0, "deinit");
    CHECK(init_hlfs("ftp://nowhere/vol") == NULL && errno == EINVAL, "a bad address: errno %d", errno);

    CHECK(hlfs_create(volume, SIZE, 4096) == 0, "create");
    CHECK(hlfs_create(volume, SIZE, 4096) == -EEXIST, "create twice");
    ctrl = init_hlfs(volume);
    CHECK(ctrl != NULL, "init_hlfs: errno %d", errno);
    CHECK(hlfs_read(ctrl, (char *)model, 1, 0) == -EBADF, "read before open");
    CHECK(hlfs_open(ctrl, HLFS_RDWR) == 0, "open: %s", why(ctrl));
    CHECK(hlfs_open(ctrl, HLFS_RDWR) == -EBUSY, "open twice");

    /* Unaligned writes and reads, across block boundaries. */
    put(1000, 5000, 1);
    put(4095, 3, 2);
    put(REGION + 17, 70000, 3);
    put(SIZE - 5, 5, 4);
    expect(ctrl, model, 0, 10000);
    expect(ctrl, model, 4094, 6);
    expect(ctrl, model, REGION, 80000);
    expect(ctrl, model, SIZE - 4096, 4096);
    /* Holes read as zeros. */
    expect(ctrl, model, 6u * REGION, 65536);
    /* Past the end: an error, and nothing written. */
    char small[20] = {0};
    rc = hlfs_read(ctrl, small, 20, SIZE - 10);
    CHECK(rc == -EINVAL, "read past the end: %d", rc);
    rc = hlfs_write(ctrl, small, 20, SIZE - 10);
    CHECK(rc == -EINVAL, "write past the end: %d", rc);
    CHECK(strstr(why(ctrl), "beyond the end") != NULL, "%s", why(ctrl));
    CHECK(hlfs_flush(ctrl) == 0, "flush: %s", why(ctrl));

    HLFS_STAT_T st;
    CHECK(hlfs_stat(ctrl, &st) == 0, "stat: %s", why(ctrl));
    CHECK(st.size == SIZE && st.block_size == 4096, "stat: %llu %u", (unsigned long long)st.size, st.block_size);
    CHECK(st.allocated_bytes >= 80000 && st.stored_bytes > 0, "stat: %llu allocated", (unsigned long long)st.allocated_bytes);

    /* A snapshot, listed, then read through a handle of its own while the
     * volume goes on changing. */
    CHECK(hlfs_take_snapshot(ctrl, "before-threads") == 0, "snapshot: %s", why(ctrl));
    CHECK(hlfs_take_snapshot(ctrl, "before-threads") == -EEXIST, "snapshot twice");
    char **names = NULL;
    size_t count = 0;
    CHECK(hlfs_list_snapshots(ctrl, &names, &count) == 0, "list: %s", why(ctrl));
    CHECK(count == 1 && strcmp(names[0], "before-threads") == 0, "%zu snapshots", count);
    hlfs_free_snapshot_list(names, count);
    unsigned char *at_snapshot = malloc(SIZE);
    memcpy(at_snapshot, model, SIZE);

    /* Eight threads on one handle. */
    pthread_t threads[THREADS];
    for (uintptr_t t = 0; t < THREADS; t++) {
        CHECK(pthread_create(&threads[t], NULL, hammer, (void *)t) == 0, "thread");
    }
    for (int t = 0; t < THREADS; t++) {
        pthread_join(threads[t], NULL);
    }
    CHECK(hlfs_write_zeroes(ctrl, 8u * REGION, 4096 * 3 + 100) == 0, "zeroes: %s", why(ctrl));
    memset(model + 8u * REGION, 0, 4096 * 3 + 100);
    CHECK(hlfs_trim(ctrl, 9u * REGION + 4096, 8192) == 0, "trim: %s", why(ctrl));
    memset(model + 9u * REGION + 4096, 0, 8192);
    CHECK(hlfs_flush(ctrl) == 0, "flush: %s", why(ctrl));
    for (uint64_t pos = 0; pos < SIZE; pos += REGION) {
        expect(ctrl, model, pos, REGION);
    }

    HLFS_CTRL *snap = init_hlfs(volume);
    CHECK(hlfs_open_snapshot(snap, "nope") == -ENOENT, "a missing snapshot");
    CHECK(hlfs_open_snapshot(snap, "before-threads") == 0, "open snapshot: %s", why(snap));
    for (uint64_t pos = 0; pos < SIZE; pos += REGION) {
        expect(snap, at_snapshot, pos, REGION);
    }
    rc = hlfs_write(snap, small, 1, 0);
    CHECK(rc == -EROFS, "write to a snapshot: %d", rc);
    CHECK(deinit_hlfs(snap) == 0, "deinit snapshot");

    CHECK(hlfs_close(ctrl) == 0, "close: %s", why(ctrl));
    CHECK(hlfs_close(ctrl) == -EBADF, "close twice");
    CHECK(deinit_hlfs(ctrl) == 0, "deinit");

    FILE *out = fopen(argv[2], "wb");
    CHECK(out != NULL, "cannot write %s", argv[2]);
    CHECK(fwrite(model, 1, SIZE, out) == SIZE, "writing %s", argv[2]);
    fclose(out);
    free(model);
    free(at_snapshot);
    printf("ok: %d writes by %d threads on one handle\n", rounds * THREADS, THREADS);
    return 0;
}
