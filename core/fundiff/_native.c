/* fundiff's compiled host code: per-sample random streams (Philox4x32-10 words, uniforms
 * and Box-Muller normals with the counter layout of fundiff/rng.py) and the CPU form of a
 * fused sampling step (out = sum_i c_i T_i + c_z z in one pass over memory).
 *
 * fundiff/_native.py compiles this file once per machine with the system C compiler and
 * loads it with ctypes; without a compiler fundiff uses the NumPy code in rng.py, which
 * gives the same Philox words bit for bit, and torch operations for the steps
 * (tests/test_rng_native.py and tests/test_native_steps.py check both).
 *
 * Counter of Philox block b of sample `id` (rng._raw_bits): (b, ctr1, id & 0xFFFFFFFF,
 * ctr3 ^ (id >> 32)), key (k0, k1). Element e of a sample takes word e % 4 of block e / 4.
 * Normals (rng.normal): pair p = (element 2p, 2p + 1) uses words 2p (radius) and 2p + 1
 * (angle): r = sqrt(-2 log u1), z = (r cos 2 pi u2, r sin 2 pi u2), u = (word + 1/2) 2^-32,
 * all in float64, the same operations in the same order as rng.normal, so the two differ
 * only by the math libraries' log, cos and sin (a few float64 ulp).
 *
 * A value depends on its counter alone, never on the batch, the sample's position, the
 * sample size or the thread count: every block goes through the same vector loop, on
 * aligned buffers whose lengths are multiples of PAD blocks (no scalar remainder and no
 * alignment peeling, whose scalar log / sin / cos could round differently), and the
 * results are then copied out.
 *
 * Steps round as the torch backend's operations do on a CPU with FMA: acc = T_0 * c_0, then
 * acc = fma(c_i, T_i, acc) per further term and fma(c_z, z, acc) for the noise, each
 * coefficient first rounded to the operands' dtype (torch's mul and add_ with alpha).
 *
 * Built with -ffp-contract=off (no fused multiply-adds but the explicit ones) and, where the
 * compiler and C library have them, the vector variants of log, sin and cos (glibc's
 * libmvec, declared below for `omp simd` loops). With -fopenmp (against the libgomp torch
 * has loaded: the tasks run on torch's own intra-op threads) a call splits its tasks over
 * `threads`; without it the caller splits the rows.
 */

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef FUNDIFF_VECTOR_MATH
#pragma omp declare simd notinbranch
double log(double);
#pragma omp declare simd notinbranch
double sin(double);
#pragma omp declare simd notinbranch
double cos(double);
#endif

#ifdef _OPENMP
#define PARALLEL_TASKS _Pragma("omp parallel for num_threads(threads) schedule(static) if (threads > 1)")
#else
#define PARALLEL_TASKS
#endif

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u
#define TWO_POW_M32 2.3283064365386963e-10 /* 2^-32 */
#define TWO_PI 6.283185307179586

#define CHUNK 256 /* blocks per task: a task's words and normals stay in L1 */
#define PAD 16    /* vector loops run over multiples of PAD blocks (every vector width divides it) */
#define ALIGNED __attribute__((aligned(64)))

typedef struct {
    uint32_t k0, k1, ctr1, ctr3;
} philox_key;

/* One task's blocks: counter words c0, c2, c3 per block (c1 = ctr1 for all), then the four
 * output words, structure of arrays. */
typedef struct {
    uint32_t c0[CHUNK] ALIGNED, c2[CHUNK] ALIGNED, c3[CHUNK] ALIGNED;
    uint32_t w[4][CHUNK] ALIGNED;
} task_words;

static inline int padded(int count) { return (count + PAD - 1) / PAD * PAD; }

/* Philox4x32-10 (Salmon et al. 2011) on blocks 0 .. count - 1 of t (count a multiple of PAD). */
static void philox_blocks(task_words *t, int count, philox_key key) {
#pragma omp simd aligned(t : 64)
    for (int b = 0; b < count; b++) {
        uint32_t x0 = t->c0[b], x1 = key.ctr1, x2 = t->c2[b], x3 = t->c3[b];
        uint32_t y0 = key.k0, y1 = key.k1;
        for (int round = 0; round < 10; round++) {
            uint64_t p0 = (uint64_t)x0 * PHILOX_M0;
            uint64_t p1 = (uint64_t)x2 * PHILOX_M1;
            uint32_t n0 = (uint32_t)(p1 >> 32) ^ x1 ^ y0;
            uint32_t n2 = (uint32_t)(p0 >> 32) ^ x3 ^ y1;
            x1 = (uint32_t)p1;
            x3 = (uint32_t)p0;
            x0 = n0;
            x2 = n2;
            y0 += PHILOX_W0;
            y1 += PHILOX_W1;
        }
        t->w[0][b] = x0;
        t->w[1][b] = x1;
        t->w[2][b] = x2;
        t->w[3][b] = x3;
    }
}

#pragma omp declare simd notinbranch
static inline double uniform_of(uint32_t word) { return ((double)word + 0.5) * TWO_POW_M32; }

/* Box-Muller: element 4b + k of z from block b's words (radius from words 0 and 2, angle
 * from words 1 and 3), count a multiple of PAD. */
static void normal_blocks(const task_words *t, int count, double *z) {
#pragma omp simd aligned(t, z : 64)
    for (int b = 0; b < count; b++) {
        double ra = sqrt(-2.0 * log(uniform_of(t->w[0][b]))), aa = TWO_PI * uniform_of(t->w[1][b]);
        double rb = sqrt(-2.0 * log(uniform_of(t->w[2][b]))), ab = TWO_PI * uniform_of(t->w[3][b]);
        z[4 * b] = ra * cos(aa);
        z[4 * b + 1] = ra * sin(aa);
        z[4 * b + 2] = rb * cos(ab);
        z[4 * b + 3] = rb * sin(ab);
    }
}

static void uniform_blocks(const task_words *t, int count, double *u) {
#pragma omp simd aligned(t, u : 64)
    for (int b = 0; b < count; b++)
        for (int k = 0; k < 4; k++) u[4 * b + k] = uniform_of(t->w[k][b]);
}

static void word_blocks(const task_words *t, int count, uint32_t *v) {
    for (int b = 0; b < count; b++)
        for (int k = 0; k < 4; k++) v[4 * b + k] = t->w[k][b];
}

enum kind { WORDS, UNIFORM, NORMAL_F64, NORMAL_F32, STEP_F64, STEP_F32 };

/* The tensor terms of a fused step: out = sum_i coefs[i] inputs[i] + noise_coef z, the
 * inputs contiguous and as long as out; with no inputs, out += noise_coef z. */
typedef struct {
    int count;
    const void *const *inputs;
    const double *coefs;
    double noise_coef;
} step_terms;

/* Elements [at, at + len) of a step's output; z (float64 normals, or NULL) for those elements. */
#define STEP_RANGE(NAME, T, FMA)                                                                 \
    static void NAME(const step_terms *s, int64_t at, int64_t len, T *out, const double *z) {  \
        T *restrict dst = out + at;                                                            \
        if (s->count > 0) {                                                                    \
            const T *restrict a = (const T *)s->inputs[0] + at;                                \
            T c = (T)s->coefs[0];                                                              \
            for (int64_t j = 0; j < len; j++) dst[j] = a[j] * c;                               \
            for (int i = 1; i < s->count; i++) {                                               \
                const T *restrict b = (const T *)s->inputs[i] + at;                            \
                T ci = (T)s->coefs[i];                                                         \
                for (int64_t j = 0; j < len; j++) dst[j] = FMA(ci, b[j], dst[j]);              \
            }                                                                                  \
        }                                                                                      \
        if (z) {                                                                               \
            T cz = (T)s->noise_coef;                                                           \
            for (int64_t j = 0; j < len; j++) dst[j] = FMA(cz, (T)z[j], dst[j]);               \
        }                                                                                      \
    }
STEP_RANGE(step_range_f32, float, fmaf)
STEP_RANGE(step_range_f64, double, fma)

/* Elements [from, from + len) of a task's 4 * count values, element j of the buffer going
 * to out[j - from + at]; the buffer holds words (kind WORDS) or doubles. The STEP kinds
 * combine them into a step's output (step_range). */
static void copy_out(enum kind kind, const void *buffer, int64_t from, int64_t len, void *out, int64_t at,
                     const step_terms *step) {
    const double *src = (const double *)buffer + from;
    if (kind == WORDS) {
        memcpy((uint32_t *)out + at, (const uint32_t *)buffer + from, (size_t)len * sizeof(uint32_t));
    } else if (kind == NORMAL_F32) {
        float *dst = (float *)out + at;
        for (int64_t j = 0; j < len; j++) dst[j] = (float)src[j];
    } else if (kind == STEP_F32) {
        step_range_f32(step, at, len, (float *)out, src);
    } else if (kind == STEP_F64) {
        step_range_f64(step, at, len, (double *)out, src);
    } else {
        memcpy((double *)out + at, src, (size_t)len * sizeof(double));
    }
}

static void values(enum kind kind, task_words *t, int count, philox_key key, void *buffer) {
    int n = padded(count);
    for (int b = count; b < n; b++) t->c0[b] = t->c2[b] = t->c3[b] = 0; /* padding blocks, discarded */
    philox_blocks(t, n, key);
    if (kind == WORDS)
        word_blocks(t, n, (uint32_t *)buffer);
    else if (kind == UNIFORM)
        uniform_blocks(t, n, (double *)buffer);
    else
        normal_blocks(t, n, (double *)buffer);
}

static inline uint32_t low_word(uint64_t id) { return (uint32_t)(id & 0xFFFFFFFFu); }
static inline uint32_t high_word(uint64_t id, philox_key key) { return key.ctr3 ^ (uint32_t)(id >> 32); }

/* rows x n values of `kind` into out (row-major). Rows of at least CHUNK / 4 blocks are cut
 * into tasks of CHUNK blocks within a row; shorter rows are packed, several per task. */
static void fill(enum kind kind, const uint64_t *ids, int64_t rows, int64_t n, philox_key key, void *out, int threads,
                 const step_terms *step) {
    int64_t per_row = (n + 3) / 4; /* blocks per row */
    if (rows <= 0 || per_row == 0) return;
    if (per_row >= CHUNK / PAD) {
        int64_t passes = (per_row + CHUNK - 1) / CHUNK;
        PARALLEL_TASKS
        for (int64_t task = 0; task < rows * passes; task++) {
            int64_t row = task / passes, first = (task % passes) * CHUNK;
            int count = (int)(per_row - first < CHUNK ? per_row - first : CHUNK);
            task_words t ALIGNED;
            double buffer[4 * CHUNK] ALIGNED;
            for (int b = 0; b < count; b++) {
                t.c0[b] = (uint32_t)(first + b);
                t.c2[b] = low_word(ids[row]);
                t.c3[b] = high_word(ids[row], key);
            }
            values(kind, &t, count, key, buffer);
            int64_t len = n - 4 * first < 4 * (int64_t)count ? n - 4 * first : 4 * (int64_t)count;
            copy_out(kind, buffer, 0, len, out, row * n + 4 * first, step);
        }
    } else {
        int64_t rows_per_task = CHUNK / per_row;
        int64_t tasks = (rows + rows_per_task - 1) / rows_per_task;
        PARALLEL_TASKS
        for (int64_t task = 0; task < tasks; task++) {
            int64_t row0 = task * rows_per_task;
            int64_t nrows = rows - row0 < rows_per_task ? rows - row0 : rows_per_task;
            task_words t ALIGNED;
            double buffer[4 * CHUNK] ALIGNED;
            int count = 0;
            for (int64_t r = 0; r < nrows; r++)
                for (int64_t b = 0; b < per_row; b++, count++) {
                    t.c0[count] = (uint32_t)b;
                    t.c2[count] = low_word(ids[row0 + r]);
                    t.c3[count] = high_word(ids[row0 + r], key);
                }
            values(kind, &t, count, key, buffer);
            for (int64_t r = 0; r < nrows; r++) copy_out(kind, buffer, r * 4 * per_row, n, out, (row0 + r) * n, step);
        }
    }
}

/* The exported functions: ids (rows), n values per row, key words, counter words 1 and 3
 * (the sample id's high bits are xor-ed into word 3 here), out (rows x n), threads; the
 * step functions take the step's terms after them. */
#define EXPORT_DRAW(NAME, T, KIND)                                                                           \
    void NAME(const uint64_t *ids, int64_t rows, int64_t n, uint32_t k0, uint32_t k1, uint32_t ctr1, uint32_t ctr3, \
              T *out, int threads) {                                                                            \
        philox_key key = {k0, k1, ctr1, ctr3};                                                                  \
        fill(KIND, ids, rows, n, key, out, threads, 0);                                                         \
    }
EXPORT_DRAW(fundiff_philox_words, uint32_t, WORDS)
EXPORT_DRAW(fundiff_philox_uniform, double, UNIFORM)
EXPORT_DRAW(fundiff_philox_normal_f64, double, NORMAL_F64)
EXPORT_DRAW(fundiff_philox_normal_f32, float, NORMAL_F32)

/* A fused step with fresh noise: out = sum_i coefs[i] inputs[i] + noise_coef z (out: rows x n,
 * the inputs of its size); with count = 0 (inputs and coefs unused), out += noise_coef z in place. */
#define EXPORT_STEP_NORMAL(NAME, T, KIND)                                                                       \
    void NAME(const uint64_t *ids, int64_t rows, int64_t n, uint32_t k0, uint32_t k1, uint32_t ctr1, uint32_t ctr3, \
              T *out, int threads, double noise_coef, int count, const T *const *inputs, const double *coefs) {  \
        philox_key key = {k0, k1, ctr1, ctr3};                                                                  \
        step_terms step = {count, (const void *const *)inputs, coefs, noise_coef};                              \
        fill(KIND, ids, rows, n, key, out, threads, &step);                                                     \
    }
EXPORT_STEP_NORMAL(fundiff_step_normal_f64, double, STEP_F64)
EXPORT_STEP_NORMAL(fundiff_step_normal_f32, float, STEP_F32)

/* A fused step without noise: out = sum_i coefs[i] inputs[i] over numel elements, in tasks
 * of STEP_TASK elements, each in L1-sized ranges (the output range is written, then updated
 * per input while it is in cache). */
#define STEP_TASK 16384
#define STEP_RANGE_LEN 2048

#define STEP_FUNCTION(NAME, T, RANGE)                                                                      \
    void NAME(int64_t numel, T *out, int threads, int count, const T *const *inputs, const double *coefs) { \
        step_terms step = {count, (const void *const *)inputs, coefs, 0.0};                               \
        int64_t tasks = (numel + STEP_TASK - 1) / STEP_TASK;                                              \
        PARALLEL_TASKS                                                                                    \
        for (int64_t task = 0; task < tasks; task++) {                                                    \
            int64_t end = (task + 1) * STEP_TASK < numel ? (task + 1) * STEP_TASK : numel;                \
            for (int64_t at = task * STEP_TASK; at < end; at += STEP_RANGE_LEN)                           \
                RANGE(&step, at, end - at < STEP_RANGE_LEN ? end - at : STEP_RANGE_LEN, out, 0);          \
        }                                                                                                 \
    }
STEP_FUNCTION(fundiff_step_f32, float, step_range_f32)
STEP_FUNCTION(fundiff_step_f64, double, step_range_f64)

/* 1 when built with OpenMP: the functions split their work over `threads` themselves. */
int fundiff_native_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* The ABI version _native.py expects: bump when a signature changes. */
int fundiff_native_abi(void) { return 5; }
