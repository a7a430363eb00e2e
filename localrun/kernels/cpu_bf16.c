/* CPU kernels for bf16-stored weights with fp32 activations and fp32 accumulation.
 *
 * A bf16 weight widens to fp32 exactly (its bits shifted left by 16), so these kernels compute the
 * same products as an fp32 matmul on the widened weights; only the order of the fp32 sums differs.
 * They read half the bytes of fp32 weights, which is what one-token decode is bound by.
 *
 * Threads: OpenMP, linked against the process's libgomp (the one torch loaded), so
 * torch.set_num_threads() governs these too.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

enum { ACT_GELU_TANH = 0, ACT_GELU = 1, ACT_SILU = 2 };
#define ROW_BLOCK 16           /* rows per work item: 16 x 4 KiB of a 2048-wide matrix stay in L1/L2 */
#define PARALLEL_MIN (1 << 16) /* fewer weights than this run on one thread */

static inline float bf16_to_f32(uint16_t u) {
    uint32_t bits = (uint32_t)u << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Software prefetch distance in weight values for a GEMV over rows of I values, read 4 rows at a
 * time: at least the next group of rows, and at least 8 KiB of bf16 ahead. One-core decode went from
 * ~20 to ~27 GB/s (bench model shapes, AMD EPYC Zen 5): the hardware prefetcher alone ramps up too
 * late on rows of a few KiB. */
#define PREFETCH_AHEAD(I) (4 * (I) > 4096 ? 4 * (I) : 4096)
#define Q4_PREFETCH_AHEAD(I) (4 * (I) > 16384 ? 4 * (I) : 16384) /* 4-bit codes: 8 KiB ahead is 16K values */

#if defined(__AVX512F__)
static inline __m512 load_bf16(const uint16_t *p, __mmask16 m) {
    __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* y[r] = dot(x, W[r]) for r in [r0, r1); W row-major with I columns. The masked tail is a step of
 * its own: a per-step mask in this loop (as in dot_rows_4tokens) made decode ~10% slower. */
static void dot_rows(const float *x, const uint16_t *W, float *y, int64_t I, int64_t r0, int64_t r1) {
    const int64_t full = I & ~(int64_t)15, ahead = PREFETCH_AHEAD(I);
    const __mmask16 tail = (__mmask16)((1u << (I - full)) - 1u);
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
        const uint16_t *w0 = W + r * I, *w1 = w0 + I, *w2 = w1 + I, *w3 = w2 + I;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t i = 0; i < full; i += 16) {
            if (!(i & 31)) { /* a cache line of each row PREFETCH_AHEAD(I) values on (hints: never fault) */
                _mm_prefetch((const char *)(w0 + ahead + i), _MM_HINT_T0);
                _mm_prefetch((const char *)(w1 + ahead + i), _MM_HINT_T0);
                _mm_prefetch((const char *)(w2 + ahead + i), _MM_HINT_T0);
                _mm_prefetch((const char *)(w3 + ahead + i), _MM_HINT_T0);
            }
            __m512 xv = _mm512_loadu_ps(x + i);
            a0 = _mm512_fmadd_ps(load_bf16(w0 + i, 0xFFFF), xv, a0);
            a1 = _mm512_fmadd_ps(load_bf16(w1 + i, 0xFFFF), xv, a1);
            a2 = _mm512_fmadd_ps(load_bf16(w2 + i, 0xFFFF), xv, a2);
            a3 = _mm512_fmadd_ps(load_bf16(w3 + i, 0xFFFF), xv, a3);
        }
        if (tail) {
            __m512 xv = _mm512_maskz_loadu_ps(tail, x + full);
            a0 = _mm512_fmadd_ps(load_bf16(w0 + full, tail), xv, a0);
            a1 = _mm512_fmadd_ps(load_bf16(w1 + full, tail), xv, a1);
            a2 = _mm512_fmadd_ps(load_bf16(w2 + full, tail), xv, a2);
            a3 = _mm512_fmadd_ps(load_bf16(w3 + full, tail), xv, a3);
        }
        y[r] = _mm512_reduce_add_ps(a0);
        y[r + 1] = _mm512_reduce_add_ps(a1);
        y[r + 2] = _mm512_reduce_add_ps(a2);
        y[r + 3] = _mm512_reduce_add_ps(a3);
    }
    for (; r < r1; r++) {
        const uint16_t *w0 = W + r * I;
        __m512 a0 = _mm512_setzero_ps();
        for (int64_t i = 0; i < full; i += 16)
            a0 = _mm512_fmadd_ps(load_bf16(w0 + i, 0xFFFF), _mm512_loadu_ps(x + i), a0);
        if (tail)
            a0 = _mm512_fmadd_ps(load_bf16(w0 + full, tail), _mm512_maskz_loadu_ps(tail, x + full), a0);
        y[r] = _mm512_reduce_add_ps(a0);
    }
}

/* Sixteen horizontal sums at once: lane i of the result is the sum of the lanes of v[REDUCE16_SOURCE[i]],
 * added in the very tree _mm512_reduce_add_ps uses (lanes i + i+8, then + i+4, + i+2, + i+1; fp32
 * addition commutes), so a dot product summed here is bit-identical to one summed by dot_rows.
 * Four levels of shuffles and adds instead of sixteen separate reductions. */
static const int REDUCE16_SOURCE[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};

static inline __m512 reduce16(const __m512 v[16]) {
    __m512 a[8], b[4], c[2];
    for (int k = 0; k < 8; k++) /* lanes i + i+8: two sources per vector, 8 partial sums each */
        a[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int k = 0; k < 4; k++) /* + i+4: four sources, 4 partial sums each (one per 128-bit lane) */
        b[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int k = 0; k < 2; k++) /* + i+2 within each 128-bit lane: eight sources, 2 partial sums each */
        c[k] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * k], b[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(b[2 * k], b[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)), /* + i+1 */
                         _mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* y[t][r] = dot(x[t], W[r]) for 4 tokens t (rows of x with stride I; of y with stride ldy) and rows
 * r in [r0, r1), r1 - r0 a multiple of 4: 16 accumulators, each weight vector widened once for
 * four tokens. Same per-output summation order as dot_rows. */
static void dot_rows_4tokens(const float *x, const uint16_t *W, float *y, int64_t ldy, int64_t I, int64_t r0,
                             int64_t r1) {
    const int64_t full = I & ~(int64_t)15;
    const __mmask16 tail = (__mmask16)((1u << (I - full)) - 1u);
    const float *x0 = x, *x1 = x + I, *x2 = x + 2 * I, *x3 = x + 3 * I;
    for (int64_t r = r0; r < r1; r += 4) {
        __m512 acc[4][4];
        for (int a = 0; a < 4; a++)
            for (int b = 0; b < 4; b++)
                acc[a][b] = _mm512_setzero_ps();
        for (int64_t i = 0; i < I; i += 16) {
            const __mmask16 m = i < full ? (__mmask16)0xFFFF : tail;
            const __m512 xv[4] = {_mm512_maskz_loadu_ps(m, x0 + i), _mm512_maskz_loadu_ps(m, x1 + i),
                                  _mm512_maskz_loadu_ps(m, x2 + i), _mm512_maskz_loadu_ps(m, x3 + i)};
            for (int a = 0; a < 4; a++) {
                const __m512 wv = load_bf16(W + (r + a) * I + i, m);
                for (int b = 0; b < 4; b++)
                    acc[a][b] = _mm512_fmadd_ps(wv, xv[b], acc[a][b]);
            }
        }
        float sums[16];
        _mm512_storeu_ps(sums, reduce16(&acc[0][0])); /* source a * 4 + b is row r + a, token b */
        for (int i = 0; i < 16; i++)
            y[(REDUCE16_SOURCE[i] & 3) * ldy + r + (REDUCE16_SOURCE[i] >> 2)] = sums[i];
    }
}
#define HAVE_4TOKENS 1
#else
/* Portable version: 16 independent lanes per row, which compilers vectorize without -ffast-math. */
static void dot_rows(const float *x, const uint16_t *W, float *y, int64_t I, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *w = W + r * I;
        float lanes[16] = {0};
        int64_t i = 0;
        for (; i + 16 <= I; i += 16)
            for (int j = 0; j < 16; j++)
                lanes[j] += bf16_to_f32(w[i + j]) * x[i + j];
        float s = 0.0f;
        for (; i < I; i++)
            s += bf16_to_f32(w[i]) * x[i];
        for (int j = 0; j < 16; j++)
            s += lanes[j];
        y[r] = s;
    }
}
#endif

/* y[t][r] = dot(x[t], W[r]) (+ bias[r]) for T tokens (x rows contiguous, y rows ldy apart) and
 * weight rows r in [r0, r1). */
static void rows_for_tokens(const float *x, int64_t T, const uint16_t *W, const float *bias, float *y, int64_t ldy,
                            int64_t I, int64_t r0, int64_t r1) {
    int64_t t = 0;
#ifdef HAVE_4TOKENS
    const int64_t r4 = r0 + ((r1 - r0) & ~(int64_t)3);
    for (; t + 4 <= T; t += 4) { /* the rows are cache-hot for every token */
        dot_rows_4tokens(x + t * I, W, y + t * ldy, ldy, I, r0, r4);
        for (int64_t b = 0; b < 4; b++)
            dot_rows(x + (t + b) * I, W, y + (t + b) * ldy, I, r4, r1);
    }
#endif
    for (; t < T; t++)
        dot_rows(x + t * I, W, y + t * ldy, I, r0, r1);
    if (bias)
        for (t = 0; t < T; t++)
            for (int64_t r = r0; r < r1; r++)
                y[t * ldy + r] += bias[r];
}

/* y[T, O] = x[T, I] @ W[O, I]^T (+ bias[O] when bias is not NULL). */
void lr_linear(const float *x, const uint16_t *W, const float *bias, float *y, int64_t T, int64_t I, int64_t O) {
    const int64_t blocks = (O + ROW_BLOCK - 1) / ROW_BLOCK;
    const int parallel = omp_get_max_threads() > 1 && I * O >= PARALLEL_MIN;
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t r0 = b * ROW_BLOCK, r1 = r0 + ROW_BLOCK < O ? r0 + ROW_BLOCK : O;
        rows_for_tokens(x, T, W, bias, y, O, I, r0, r1);
    }
}

/* exp(x) to ~1 ulp in plain arithmetic (Cody-Waite reduction, Cephes' degree-6 polynomial), so
 * the activation loops vectorize; libm's expf/tanhf are scalar calls (~15 ns each, which made them
 * the cost of a prefill's expert layer). Inputs are clamped to [-87.3, 88.7]. */
static inline float exp_approx(float x) {
    x = x > 88.7f ? 88.7f : x < -87.3f ? -87.3f : x;
    const float t = x * 1.44269504088896341f;
    const float n = (t + 12582912.0f) - 12582912.0f; /* round to nearest, |t| < 2^22 */
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    const float z = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * z + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23; /* 2^n */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* gelu_pytorch_tanh(v) = 0.5 v (1 + tanh(u)) = v * sigmoid(2u), u = sqrt(2/pi) (v + 0.044715 v^3). */
static inline float activate(float v, int act) {
    switch (act) {
    case ACT_GELU_TANH:
        return v / (1.0f + exp_approx(-1.5957691216057308f * (v + 0.044715f * v * v * v)));
    case ACT_GELU:
        return 0.5f * v * (1.0f + erff(v * 0.7071067811865476f));
    default:
        return v / (1.0f + exp_approx(-v));
    }
}

/* a[f] = act(gate[f]) * up[f] for f < F; a separate loop per activation so each one vectorizes. */
static void gated(const float *gate, const float *up, float *a, int64_t F, int act) {
    if (act == ACT_GELU_TANH)
        for (int64_t f = 0; f < F; f++)
            a[f] = activate(gate[f], ACT_GELU_TANH) * up[f];
    else if (act == ACT_SILU)
        for (int64_t f = 0; f < F; f++)
            a[f] = activate(gate[f], ACT_SILU) * up[f];
    else
        for (int64_t f = 0; f < F; f++)
            a[f] = activate(gate[f], ACT_GELU) * up[f];
}

/* One token through K routed experts: out[H] = sum_k w[k] * down[e] @ (act(gate[e] @ x) * (up[e] @ x)),
 * e = ids[k]; gate_up [E, 2F, H] (gate rows first), down [E, H, F], both bf16.
 * Threads split the K experts (thread t takes k = t, t + n, ...), each summing into its own fp32
 * row of `scratch` (at least threads * (2H + 2F) floats); the rows are then added in thread order,
 * so the result depends only on the thread count. */
int lr_moe_one_token(const float *x, const uint16_t *gate_up, const uint16_t *down, const int64_t *ids,
                     const float *w, int64_t K, int64_t E, int64_t H, int64_t F, int act, float *out, float *scratch,
                     int64_t scratch_floats) {
    for (int64_t k = 0; k < K; k++)
        if (ids[k] < 0 || ids[k] >= E)
            return -1;
    int threads = omp_get_max_threads();
    if (threads > K)
        threads = (int)K;
    if ((int64_t)threads * (2 * H + 2 * F) > scratch_floats)
        threads = (int)(scratch_floats / (2 * H + 2 * F));
    if (threads < 1)
        threads = 1;
    for (int i = 0; i < threads; i++) /* a row OpenMP gives no thread to stays zero */
        memset(scratch + (int64_t)i * (2 * H + 2 * F), 0, sizeof(float) * H);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        float *acc = scratch + (int64_t)t * (2 * H + 2 * F), *y = acc + H, *h = y + H;
        for (int64_t k = t; k < K; k += n) {
            const int64_t e = ids[k];
            dot_rows(x, gate_up + e * 2 * F * H, h, H, 0, 2 * F);
            gated(h, h + F, h, F, act); /* in place: element j reads h[j], h[F + j], writes h[j] */
            dot_rows(h, down + e * H * F, y, F, 0, H);
            const float wk = w[k];
            for (int64_t j = 0; j < H; j++)
                acc[j] += wk * y[j];
        }
    }
    memcpy(out, scratch, sizeof(float) * H);
    for (int i = 1; i < threads; i++)
        for (int64_t j = 0; j < H; j++)
            out[j] += scratch[(int64_t)i * (2 * H + 2 * F) + j];
    return 0;
}

/* Many tokens through their experts: out[T, H] = sum_k w[t,k] * expert_{ids[t,k]}(x[t]), same math as
 * lr_moe_one_token. Experts run one after another in id order, all threads on each (weight rows
 * split between them), so every token's K contributions are added in expert order whatever the
 * thread count. `order` (T*K ints) receives the (token, k) pairs grouped by expert; scratch holds
 * T*(2H + 3F) floats (gathered inputs, gate/up, activations, expert outputs). Returns -1 (and
 * computes nothing) when an id is not in [0, E). */
int lr_moe_tokens(const float *x, const uint16_t *gate_up, const uint16_t *down, const int64_t *ids, const float *w,
                   int64_t T, int64_t K, int64_t E, int64_t H, int64_t F, int act, float *out, int64_t *order,
                   int64_t *starts, float *scratch) {
    /* counting sort of the T*K (token, k) pairs by expert; starts has E + 1 entries */
    for (int64_t j = 0; j < T * K; j++)
        if (ids[j] < 0 || ids[j] >= E)
            return -1;
    memset(starts, 0, sizeof(int64_t) * (E + 1));
    for (int64_t j = 0; j < T * K; j++)
        starts[ids[j] + 1]++;
    for (int64_t e = 0; e < E; e++)
        starts[e + 1] += starts[e];
    for (int64_t j = 0; j < T * K; j++)
        order[starts[ids[j]]++] = j; /* stable: tokens stay in order within an expert */
    for (int64_t e = E; e > 0; e--)
        starts[e] = starts[e - 1];
    starts[0] = 0;
    memset(out, 0, sizeof(float) * T * H);
    float *xe = scratch, *h = xe + T * H, *a = h + T * 2 * F, *y = a + T * F;
    const int parallel = omp_get_max_threads() > 1 && T * H * F >= PARALLEL_MIN;
#pragma omp parallel if (parallel)
    for (int64_t e = 0; e < E; e++) {
        const int64_t first = starts[e], n = starts[e + 1] - first;
        if (n == 0)
            continue;
        const int64_t *pairs = order + first;
#pragma omp for schedule(static)
        for (int64_t j = 0; j < n; j++)
            memcpy(xe + j * H, x + (pairs[j] / K) * H, sizeof(float) * H);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < (2 * F + ROW_BLOCK - 1) / ROW_BLOCK; b++) {
            const int64_t r0 = b * ROW_BLOCK, r1 = r0 + ROW_BLOCK < 2 * F ? r0 + ROW_BLOCK : 2 * F;
            rows_for_tokens(xe, n, gate_up + e * 2 * F * H, NULL, h, 2 * F, H, r0, r1);
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < n; j++)
            gated(h + j * 2 * F, h + j * 2 * F + F, a + j * F, F, act);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < (H + ROW_BLOCK - 1) / ROW_BLOCK; b++) {
            const int64_t r0 = b * ROW_BLOCK, r1 = r0 + ROW_BLOCK < H ? r0 + ROW_BLOCK : H;
            rows_for_tokens(a, n, down + e * H * F, NULL, y, H, F, r0, r1);
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < n; j++) { /* one expert never appears twice for a token: no conflicts */
            const float wj = w[pairs[j]];
            float *o = out + (pairs[j] / K) * H;
            for (int64_t c = 0; c < H; c++)
                o[c] += wj * y[j * H + c];
        }
    }
    return 0;
}

/* 1 / sqrt(mean(x^2) + eps) of one row of H values (16 lanes, then the tail, then the lanes). */
static inline float rms_scale(const float *xr, int64_t H, float eps) {
    float lanes[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= H; i += 16)
        for (int j = 0; j < 16; j++)
            lanes[j] += xr[i + j] * xr[i + j];
    float ss = 0.0f;
    for (; i < H; i++)
        ss += xr[i] * xr[i];
    for (int j = 0; j < 16; j++)
        ss += lanes[j];
    return 1.0f / sqrtf(ss / (float)H + eps);
}

/* RMSNorm of `rows` rows of H fp32 values: out = x / sqrt(mean(x^2) + eps) * weight (weight may be
 * NULL: no scale). Decode calls it ~11 times per layer on a few hundred values each, where torch's
 * composite op costs more in dispatch than in arithmetic; prefill, on many rows, ~3x faster too.
 * Input row r is head r % heads of token r / heads, tokens `stride` floats apart (the heads of a
 * token are adjacent: q/k/v heads read in place from the fused projection); out is contiguous. */
void lr_rms_norm(const float *x, const float *weight, float *out, int64_t rows, int64_t heads, int64_t stride,
                 int64_t H, float eps) {
    const int parallel = omp_get_max_threads() > 1 && rows * H >= PARALLEL_MIN;
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + (r / heads) * stride + (r % heads) * H;
        float *o = out + r * H;
        const float scale = rms_scale(xr, H, eps);
        if (weight)
            for (int64_t i = 0; i < H; i++)
                o[i] = xr[i] * scale * weight[i];
        else
            for (int64_t i = 0; i < H; i++)
                o[i] = xr[i] * scale;
    }
}

/* A head's RMSNorm (with weight) followed by RoPE, as apply_rope(lr_rms_norm(x)) computes them in
 * torch: out[d] = n[d] * cos[d] + n[(d + D/2) % D] * sin[d], sin's first half already negated. Rows
 * of D values laid out as in lr_rms_norm; row r is a head of token (r / heads) % T, whose cos and sin
 * rows are cos + t * D. Built without FMA contraction (-std=c11), each product and the sum round
 * as torch's do. */
void lr_rms_norm_rope(const float *x, const float *weight, const float *cos, const float *sin, float *out,
                      int64_t rows, int64_t heads, int64_t stride, int64_t T, int64_t D, float eps) {
    const int64_t half = D / 2;
    const int parallel = omp_get_max_threads() > 1 && rows * D >= PARALLEL_MIN;
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t t = (r / heads) % T;
        const float *xr = x + (r / heads) * stride + (r % heads) * D, *c = cos + t * D, *s = sin + t * D;
        float *o = out + r * D;
        const float scale = rms_scale(xr, D, eps);
        for (int64_t d = 0; d < half; d++) {
            const float lo = xr[d] * scale * weight[d], hi = xr[d + half] * scale * weight[d + half];
            o[d] = lo * c[d] + hi * s[d];
            o[d + half] = hi * c[d + half] + lo * s[d + half];
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * 4-bit experts: bitsandbytes NF4/FP4 codes in localrun's packed layout (quant/nf4.py), fp32 math.
 *
 * A matrix [rows, cols] is its codes (two per byte, the first of the pair in the high nibble, the
 * flat row-major order of bitsandbytes) and one absmax per `blocksize` consecutive values of that
 * flat order: fp32, or with double quantization a uint8 code into the 256-value dynamic table
 * times an fp32 absmax per 256 blocks, plus one fp32 offset (computed here as bitsandbytes does:
 * (dyn[q] * nested) + offset, two roundings). Weight = code_table[nibble] * absmax, the very fp32
 * product bitsandbytes' dequantize_4bit writes, so these kernels compute an fp32 matmul on the
 * dequantized weights; only the order of the fp32 sums differs.
 *
 * Columns go 32 at a time (16 code bytes): cols % 32 == 0 and blocksize a power of two >= 32, so
 * a 32-chunk never straddles two blocks. Per chunk and row, the 16-float code table is scaled by
 * the chunk's absmax in one multiply, the 16 bytes widen to 16 dword lanes, and a permute indexed
 * by the nibbles (lane j: byte j >> 4, the even value; byte j itself, the odd one: the permute
 * reads only the low 4 bits) gives the 16 even and the 16 odd weights. The input vector is
 * deinterleaved to match (q4_deinterleave: per 32 values, the even ones then the odd ones).
 * Every (row, token) dot product runs the same instruction sequence whatever the batch: one
 * accumulator, fma(even) then fma(odd) per chunk, then the reduction tree of _mm512_reduce_add_ps
 * (reduce16 reproduces it), so rows are bit-identical whatever the token count and thread count.
 * ------------------------------------------------------------------------------------------- */

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#include <immintrin.h>
#endif

#define Q4_NESTED 256

typedef struct {
    const uint8_t *codes;  /* rows * cols / 2 bytes */
    const float *absmax;   /* one per block: stored fp32, or scratch filled by q4_absmax */
    int shift;             /* log2(blocksize) */
    int64_t cols;
} q4mat;

/* x [n] -> out [n]: per 32 values, x[0], x[2], ..., x[30], then x[1], x[3], ..., x[31]. */
static inline void q4_deinterleave(const float *x, float *out, int64_t n) {
    for (int64_t c = 0; c < n; c += 32)
        for (int j = 0; j < 16; j++) {
            out[c + j] = x[c + 2 * j];
            out[c + 16 + j] = x[c + 2 * j + 1];
        }
}

static inline float load_f32(const uint8_t *p) {
    float f;
    memcpy(&f, p, sizeof f);
    return f;
}

/* A matrix of one expert row: offsets[0..3] are codes / absmax / nested absmax / nested offset
 * (bytes into the row); with double quant the absmax of every block is computed into `scratch`. */
static q4mat q4_matrix(const uint8_t *row, const int64_t *offsets, int64_t rows, int64_t cols, int shift, int dq,
                       const float *dyn, float *scratch) {
    q4mat m;
    m.codes = row + offsets[0];
    m.shift = shift;
    m.cols = cols;
    if (!dq) {
        m.absmax = (const float *)(row + offsets[1]);
        return m;
    }
    const int64_t blocks = (rows * cols + ((int64_t)1 << shift) - 1) >> shift;
    const uint8_t *q = row + offsets[1], *nested = row + offsets[2];
    const float offset = load_f32(row + offsets[3]);
    for (int64_t b = 0; b < blocks; b++) {
        const float a = dyn[q[b]] * load_f32(nested + 4 * (b / Q4_NESTED));
        scratch[b] = a + offset;
    }
    m.absmax = scratch;
    return m;
}

#if defined(__AVX512F__)
/* The 16 even and 16 odd weights of the chunk at flat index f (a multiple of 32). */
#define Q4_WEIGHTS(m, tbl, f, we, wo)                                                                 \
    do {                                                                                              \
        const __m512 t_ = _mm512_mul_ps(tbl, _mm512_set1_ps((m)->absmax[(f) >> (m)->shift]));          \
        const __m512i v_ = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)((m)->codes + (f) / 2))); \
        we = _mm512_permutexvar_ps(_mm512_srli_epi32(v_, 4), t_);                                      \
        wo = _mm512_permutexvar_ps(v_, t_);                                                            \
    } while (0)

/* y[r] = dot(x, W[r]) for rows [r0, r1), x deinterleaved. */
static void q4_dot_rows(const float *xd, const q4mat *m, const float *table, float *y, int64_t r0, int64_t r1) {
    const int64_t I = m->cols;
    const __m512 tbl = _mm512_loadu_ps(table);
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t c = 0; c < I; c += 32) {
#ifndef LR_NO_Q4_PREFETCH
            if (!(c & 127)) /* a cache line of codes (128 values) of each row, as dot_rows does */
                for (int a = 0; a < 4; a++)
                    _mm_prefetch((const char *)(m->codes + ((r + a) * I + c + Q4_PREFETCH_AHEAD(I)) / 2), _MM_HINT_T0);
#endif
            const __m512 xe = _mm512_loadu_ps(xd + c), xo = _mm512_loadu_ps(xd + c + 16);
            for (int a = 0; a < 4; a++) {
                __m512 we, wo;
                Q4_WEIGHTS(m, tbl, (r + a) * I + c, we, wo);
                acc[a] = _mm512_fmadd_ps(we, xe, acc[a]);
                acc[a] = _mm512_fmadd_ps(wo, xo, acc[a]);
            }
        }
        for (int a = 0; a < 4; a++)
            y[r + a] = _mm512_reduce_add_ps(acc[a]);
    }
    for (; r < r1; r++) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t c = 0; c < I; c += 32) {
            __m512 we, wo;
            Q4_WEIGHTS(m, tbl, r * I + c, we, wo);
            acc = _mm512_fmadd_ps(we, _mm512_loadu_ps(xd + c), acc);
            acc = _mm512_fmadd_ps(wo, _mm512_loadu_ps(xd + c + 16), acc);
        }
        y[r] = _mm512_reduce_add_ps(acc);
    }
}

/* 4 tokens (x rows I apart, y rows ldy apart) x rows [r0, r1), r1 - r0 a multiple of 4: each
 * chunk's weights decoded once for 4 tokens; per output the same sequence as q4_dot_rows. */
static void q4_dot_rows_4tokens(const float *xd, const q4mat *m, const float *table, float *y, int64_t ldy,
                                int64_t r0, int64_t r1) {
    const int64_t I = m->cols;
    const __m512 tbl = _mm512_loadu_ps(table);
    for (int64_t r = r0; r < r1; r += 4) {
        __m512 acc[4][4];
        for (int a = 0; a < 4; a++)
            for (int b = 0; b < 4; b++)
                acc[a][b] = _mm512_setzero_ps();
        for (int64_t c = 0; c < I; c += 32) {
            __m512 xe[4], xo[4];
            for (int b = 0; b < 4; b++) {
                xe[b] = _mm512_loadu_ps(xd + b * I + c);
                xo[b] = _mm512_loadu_ps(xd + b * I + c + 16);
            }
            for (int a = 0; a < 4; a++) {
                __m512 we, wo;
                Q4_WEIGHTS(m, tbl, (r + a) * I + c, we, wo);
                for (int b = 0; b < 4; b++) {
                    acc[a][b] = _mm512_fmadd_ps(we, xe[b], acc[a][b]);
                    acc[a][b] = _mm512_fmadd_ps(wo, xo[b], acc[a][b]);
                }
            }
        }
        float sums[16];
        _mm512_storeu_ps(sums, reduce16(&acc[0][0]));
        for (int i = 0; i < 16; i++)
            y[(REDUCE16_SOURCE[i] & 3) * ldy + r + (REDUCE16_SOURCE[i] >> 2)] = sums[i];
    }
}
#define Q4_HAVE_4TOKENS 1
#define Q4_ISA "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
/* 16 table values in two registers: permute each half by the low 3 bits, pick by bit 3. */
static inline __m256 q4_lut(__m256i idx, __m256 lo, __m256 hi) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                            _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

static inline float q4_reduce8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static void q4_dot_rows(const float *xd, const q4mat *m, const float *table, float *y, int64_t r0, int64_t r1) {
    const int64_t I = m->cols;
    const __m256 lo = _mm256_loadu_ps(table), hi = _mm256_loadu_ps(table + 8);
    for (int64_t r = r0; r < r1; r++) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t c = 0; c < I; c += 32) {
            const int64_t f = r * I + c;
            const __m256 s = _mm256_set1_ps(m->absmax[f >> m->shift]);
            const __m256 tlo = _mm256_mul_ps(lo, s), thi = _mm256_mul_ps(hi, s);
            const __m128i raw = _mm_loadu_si128((const __m128i *)(m->codes + f / 2));
            for (int h = 0; h < 2; h++) {
                const __m256i v = _mm256_cvtepu8_epi32(h ? _mm_srli_si128(raw, 8) : raw);
                acc = _mm256_fmadd_ps(q4_lut(_mm256_srli_epi32(v, 4), tlo, thi), _mm256_loadu_ps(xd + c + 8 * h), acc);
                acc = _mm256_fmadd_ps(q4_lut(v, tlo, thi), _mm256_loadu_ps(xd + c + 16 + 8 * h), acc);
            }
        }
        y[r] = q4_reduce8(acc);
    }
}
#define Q4_ISA "avx2"
#else
static void q4_dot_rows(const float *xd, const q4mat *m, const float *table, float *y, int64_t r0, int64_t r1) {
    const int64_t I = m->cols;
    for (int64_t r = r0; r < r1; r++) {
        float lanes[16] = {0};
        for (int64_t c = 0; c < I; c += 32) {
            const int64_t f = r * I + c;
            const float s = m->absmax[f >> m->shift];
            const uint8_t *q = m->codes + f / 2;
            for (int j = 0; j < 16; j++) {
                lanes[j] += (table[q[j] >> 4] * s) * xd[c + j];
                lanes[j] += (table[q[j] & 15] * s) * xd[c + 16 + j];
            }
        }
        float acc = 0.0f;
        for (int j = 0; j < 16; j++)
            acc += lanes[j];
        y[r] = acc;
    }
}
#define Q4_ISA "scalar"
#endif

/* The instruction set the 4-bit kernel was built for. */
const char *lr_q4_isa(void) { return Q4_ISA; }

/* y[t][r] for T tokens (deinterleaved rows of x, m->cols apart) and rows [r0, r1). */
static void q4_rows_for_tokens(const float *xd, int64_t T, const q4mat *m, const float *table, float *y, int64_t ldy,
                               int64_t r0, int64_t r1) {
    const int64_t I = m->cols;
    int64_t t = 0;
#ifdef Q4_HAVE_4TOKENS
    const int64_t r4 = r0 + ((r1 - r0) & ~(int64_t)3);
    for (; t + 4 <= T; t += 4) {
        q4_dot_rows_4tokens(xd + t * I, m, table, y + t * ldy, ldy, r0, r4);
        for (int64_t b = 0; b < 4; b++)
            q4_dot_rows(xd + (t + b) * I, m, table, y + (t + b) * ldy, r4, r1);
    }
#endif
    for (; t < T; t++)
        q4_dot_rows(xd + t * I, m, table, y + t * ldy, r0, r1);
}

static int q4_shift(int64_t blocksize) {
    int s = 0;
    while (((int64_t)1 << s) < blocksize)
        s++;
    return ((int64_t)1 << s) == blocksize && s >= 5 ? s : -1;
}

/* Floats of scratch lr_moe_4bit needs (the Python side allocates this many). */
int64_t lr_moe_4bit_scratch(int64_t T, int64_t K, int64_t H, int64_t F, int64_t blocksize, int dq, int threads) {
    const int64_t ab = dq ? (2 * F * H + blocksize - 1) / blocksize + (H * F + blocksize - 1) / blocksize : 0;
    const int64_t one = H + K * H + (int64_t)threads * (3 * F + ab);
    const int64_t many = T * (2 * H + 3 * F) + ab;
    return one > many ? one : many;
}

/* out[T, H] = sum_k w[t,k] * expert_{ids[t,k]}(x[t]) over 4-bit experts: expert e's packed bytes
 * start at rows[e] (any address: rows of one layer buffer, or of a store's resident / host
 * buffers), `offsets` (8) locate codes / absmax / nested absmax / nested offset of gate_up [2F, H]
 * then down [H, F] inside it; table: the 16 NF4/FP4 values; dyn: the 256-value nested table.
 * Each token's K outputs are added in expert id order, out = out + w * y from zero (fp32, no FMA:
 * the arithmetic of moe.dispatch), and every expert output row is computed by one thread in one
 * fixed sequence, so the result is independent of T, of the thread count and of where experts lie.
 * One token with K >= threads: threads split the K experts; otherwise experts one after another in
 * id order, all threads on each (rows split). Returns 0, -1 (an id out of range or a NULL row),
 * -2 (shape or blocksize unsupported) or -3 (scratch too small); nothing is written unless 0. */
int lr_moe_4bit(const float *x, const uint8_t *const *rows, const int64_t *offsets, const float *table,
                const float *dyn, const int64_t *ids, const float *w, int64_t T, int64_t K, int64_t E, int64_t H,
                int64_t F, int64_t blocksize, int dq, int act, float *out, int64_t *order, int64_t *starts,
                float *scratch, int64_t scratch_floats) {
    const int shift = q4_shift(blocksize);
    if (shift < 0 || H % 32 || F % 32 || H <= 0 || F <= 0)
        return -2;
    for (int64_t j = 0; j < T * K; j++)
        if (ids[j] < 0 || ids[j] >= E || rows[ids[j]] == NULL)
            return -1;
    int threads = omp_get_max_threads();
    if (scratch_floats < lr_moe_4bit_scratch(T, K, H, F, blocksize, dq, 1))
        return -3;
    const int64_t ab = dq ? (2 * F * H + blocksize - 1) / blocksize + (H * F + blocksize - 1) / blocksize : 0;
    if (T == 1 && K >= threads && threads > 1) {
        while (threads > 1 && lr_moe_4bit_scratch(1, K, H, F, blocksize, dq, threads) > scratch_floats)
            threads--;
    }
    if (T == 1 && (K >= threads || threads == 1)) {
        float *xd = scratch, *Y = xd + H, *per = Y + K * H;
        q4_deinterleave(x, xd, H);
#pragma omp parallel num_threads(threads) if (threads > 1)
        {
            const int t = omp_get_thread_num(), n = omp_get_num_threads();
            float *h = per + (int64_t)t * (3 * F + ab), *ad = h + 2 * F, *abs = ad + F;
            for (int64_t k = t; k < K; k += n) {
                const uint8_t *row = rows[ids[k]];
                const q4mat gu = q4_matrix(row, offsets, 2 * F, H, shift, dq, dyn, abs);
                q4_dot_rows(xd, &gu, table, h, 0, 2 * F);
                gated(h, h + F, h, F, act);
                q4_deinterleave(h, ad, F);
                const q4mat dn = q4_matrix(row, offsets + 4, H, F, shift, dq, dyn, abs);
                q4_dot_rows(ad, &dn, table, Y + k * H, 0, H);
            }
        }
        int64_t sorted[64], *idx = K <= 64 ? sorted : order;
        for (int64_t k = 0; k < K; k++) { /* insertion sort of k by expert id */
            int64_t j = k;
            while (j > 0 && ids[idx[j - 1]] > ids[k]) {
                idx[j] = idx[j - 1];
                j--;
            }
            idx[j] = k;
        }
        memset(out, 0, sizeof(float) * H);
        for (int64_t i = 0; i < K; i++) {
            const float wk = w[idx[i]];
            const float *y = Y + idx[i] * H;
            for (int64_t c = 0; c < H; c++)
                out[c] = out[c] + wk * y[c];
        }
        return 0;
    }
    /* counting sort of the T*K (token, k) pairs by expert, as in lr_moe_tokens */
    memset(starts, 0, sizeof(int64_t) * (E + 1));
    for (int64_t j = 0; j < T * K; j++)
        starts[ids[j] + 1]++;
    for (int64_t e = 0; e < E; e++)
        starts[e + 1] += starts[e];
    for (int64_t j = 0; j < T * K; j++)
        order[starts[ids[j]]++] = j;
    for (int64_t e = E; e > 0; e--)
        starts[e] = starts[e - 1];
    starts[0] = 0;
    memset(out, 0, sizeof(float) * T * H);
    float *xe = scratch, *h = xe + T * H, *ad = h + T * 2 * F, *y = ad + T * F, *abs = y + T * H;
    const int parallel = threads > 1 && T * H * F >= PARALLEL_MIN;
#pragma omp parallel if (parallel)
    for (int64_t e = 0; e < E; e++) {
        const int64_t first = starts[e], n = starts[e + 1] - first;
        if (n == 0)
            continue;
        const int64_t *pairs = order + first;
        const uint8_t *row = rows[e];
        q4mat gu, dn;
#pragma omp single
        {
            q4_matrix(row, offsets, 2 * F, H, shift, dq, dyn, abs);
            q4_matrix(row, offsets + 4, H, F, shift, dq, dyn, abs + (dq ? (2 * F * H + blocksize - 1) / blocksize : 0));
        } /* implicit barrier: the absmax scratch is filled */
        gu = q4_matrix(row, offsets, 2 * F, H, shift, 0, dyn, abs);
        dn = q4_matrix(row, offsets + 4, H, F, shift, 0, dyn, abs);
        if (dq) {
            gu.absmax = abs;
            dn.absmax = abs + (2 * F * H + blocksize - 1) / blocksize;
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < n; j++)
            q4_deinterleave(x + (pairs[j] / K) * H, xe + j * H, H);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < (2 * F + ROW_BLOCK - 1) / ROW_BLOCK; b++) {
            const int64_t r0 = b * ROW_BLOCK, r1 = r0 + ROW_BLOCK < 2 * F ? r0 + ROW_BLOCK : 2 * F;
            q4_rows_for_tokens(xe, n, &gu, table, h, 2 * F, r0, r1);
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < n; j++) {
            gated(h + j * 2 * F, h + j * 2 * F + F, h + j * 2 * F, F, act);
            q4_deinterleave(h + j * 2 * F, ad + j * F, F);
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < (H + ROW_BLOCK - 1) / ROW_BLOCK; b++) {
            const int64_t r0 = b * ROW_BLOCK, r1 = r0 + ROW_BLOCK < H ? r0 + ROW_BLOCK : H;
            q4_rows_for_tokens(ad, n, &dn, table, y, H, r0, r1);
        }
#pragma omp for schedule(static)
        for (int64_t j = 0; j < n; j++) { /* one expert never appears twice for a token: no conflicts */
            const float wj = w[pairs[j]];
            float *o = out + (pairs[j] / K) * H;
            for (int64_t c = 0; c < H; c++)
                o[c] = o[c] + wj * y[j * H + c];
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * A Gemma 4 layer's glue (kernels/fused.py): the ops decode runs between attention, the router and
 * the FFNs, a row per token, in the very order of the unfused layer's fp32 torch ops (products
 * left to right, no FMA contraction), so the results are the unfused layer's bit for bit; only the
 * router's softmax uses libm's expf where torch uses its own vectorised exp.
 * ------------------------------------------------------------------------------------------- */

/* y = norm(x) * w_post + res, then norm(y) * w_mlp, norm(y) * w_moe, norm(y) * w_router * router_scale. */
void lr_attention_residual_norms(const float *x, const float *w_post, const float *res, const float *w_mlp,
                                 const float *w_moe, const float *w_router, float *y, float *o_mlp, float *o_moe,
                                 float *o_router, int64_t rows, int64_t H, float eps, float router_scale) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * H, *rr = res + r * H;
        float *yr = y + r * H;
        const float s = rms_scale(xr, H, eps);
        for (int64_t i = 0; i < H; i++)
            yr[i] = xr[i] * s * w_post[i] + rr[i];
        const float s2 = rms_scale(yr, H, eps);
        for (int64_t i = 0; i < H; i++) {
            const float n = yr[i] * s2;
            o_mlp[r * H + i] = n * w_mlp[i];
            o_moe[r * H + i] = n * w_moe[i];
            o_router[r * H + i] = n * w_router[i] * router_scale;
        }
    }
}

/* out = (norm(norm(mlp) * w1 + norm(moe) * w2) * w + res) * scalar; h is H floats of scratch. */
void lr_ffn_residual(const float *mlp, const float *w1, const float *moe, const float *w2, const float *w,
                     const float *res, float scalar, float *out, float *h, int64_t rows, int64_t H, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *a = mlp + r * H, *b = moe + r * H, *rr = res + r * H;
        const float sa = rms_scale(a, H, eps), sb = rms_scale(b, H, eps);
        for (int64_t i = 0; i < H; i++)
            h[i] = a[i] * sa * w1[i] + b[i] * sb * w2[i];
        const float sh = rms_scale(h, H, eps);
        for (int64_t i = 0; i < H; i++)
            out[r * H + i] = (h[i] * sh * w[i] + rr[i]) * scalar;
    }
}

/* One row: softmax of E logits into p, then the K largest (largest first, a tie to the lower id) into
 * ids and w; returns their sum (p is left with -1 at the chosen ids). A NaN or +inf logit makes the
 * whole row NaN: those still count as candidates, so the ids stay in [0, E) (the lowest K) with NaN
 * weights, as torch's softmax and topk give NaN; `p[e] >= 0.0f` picked none and wrote p[-1]. */
static float softmax_top_k(const float *l, int64_t E, int64_t K, int64_t *ids, float *w, float *p) {
    float top = l[0], sum = 0.0f;
    for (int64_t e = 1; e < E; e++)
        top = l[e] > top ? l[e] : top;
    for (int64_t e = 0; e < E; e++)
        sum += p[e] = expf(l[e] - top);
    for (int64_t e = 0; e < E; e++)
        p[e] = p[e] / sum;
    float kept = 0.0f;
    for (int64_t k = 0; k < K; k++) {
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++)
            if (!(p[e] < 0.0f) && (best < 0 || p[e] > p[best]))
                best = e;
        ids[k] = best;
        w[k] = p[best];
        kept += p[best];
        p[best] = -1.0f;
    }
    return kept;
}

/* Per row of E logits: softmax, the K largest (largest first, a tie to the lower id), renormalised
 * over those K, times scale[id]. */
void lr_route(const float *logits, const float *scale, int64_t *ids, float *w, int64_t T, int64_t E, int64_t K,
              float *p) {
    for (int64_t t = 0; t < T; t++) {
        const float kept = softmax_top_k(logits + t * E, E, K, ids + t * K, w + t * K, p);
        for (int64_t k = 0; k < K; k++)
            w[t * K + k] = w[t * K + k] / kept * scale[ids[t * K + k]];
    }
}

/* Qwen3-MoE's and Mixtral's router (qwen3_moe.Router) per row of E logits: softmax, the K largest as
 * lr_route picks them, divided by their sum when `norm` (norm_topk_prob; Mixtral's always). */
void lr_route_top_k(const float *logits, int64_t *ids, float *w, int64_t T, int64_t E, int64_t K, int norm, float *p) {
    for (int64_t t = 0; t < T; t++) {
        const float kept = softmax_top_k(logits + t * E, E, K, ids + t * K, w + t * K, p);
        if (norm)
            for (int64_t k = 0; k < K; k++)
                w[t * K + k] = w[t * K + k] / kept;
    }
}

/* ---------------------------------------------------------------------------------------------
 * One decoded token's attention, fp32: softmax(q k^T * scale + mask) v for one query per head over
 * S keys, head h reading KV head h / (N / KV). q is [B, N, D] with strides (sqb, sqh); k and v rows
 * of D contiguous floats at strides (b, kv head, key); mask: S bytes, nonzero = visible, or NULL;
 * out [B, N, D] contiguous; scratch: S floats per thread. SDPA's CPU kernel costs ~35 us a call in
 * setup at decode sizes, where this is the work itself.
 * ------------------------------------------------------------------------------------------- */
/* dot(a, b) of n floats: 16 lanes of products and sums (no FMA), then the lanes summed as a tree.
 * One dependency chain of n / 16 adds per dot instead of n, and the compiler's vectors. */
static inline float dot_lanes(const float *a, const float *b, int64_t n) {
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i)));
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
        acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i)));
    }
    return _mm512_reduce_add_ps(acc);
#else
    float lanes[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++)
            lanes[j] += a[i + j] * b[i + j];
    for (int j = 0; i + j < n; j++)
        lanes[j] += a[i + j] * b[i + j];
    for (int w = 8; w >= 1; w /= 2)
        for (int j = 0; j < w; j++)
            lanes[j] += lanes[j + w];
    return lanes[0];
#endif
}

#if defined(__AVX512F__)
/* Scores of one query against 16 keys (rows ks, ks + sks, ...): 16 accumulators of lane products
 * summed by reduce16, the very tree of dot_lanes' _mm512_reduce_add_ps, so each score is
 * bit-identical to dot_lanes(q, key, D); one reduction per 16 keys instead of one per key. */
static inline __m512 dot16_keys(const float *q, const float *ks, int64_t sks, int64_t D) {
    __m512 acc[16];
    for (int j = 0; j < 16; j++)
        acc[j] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= D; i += 16) {
        const __m512 qv = _mm512_loadu_ps(q + i);
        for (int j = 0; j < 16; j++)
            acc[j] = _mm512_add_ps(acc[j], _mm512_mul_ps(qv, _mm512_loadu_ps(ks + j * sks + i)));
    }
    if (i < D) {
        const __mmask16 m = (__mmask16)((1u << (D - i)) - 1u);
        const __m512 qv = _mm512_maskz_loadu_ps(m, q + i);
        for (int j = 0; j < 16; j++)
            acc[j] = _mm512_add_ps(acc[j], _mm512_mul_ps(qv, _mm512_maskz_loadu_ps(m, ks + j * sks + i)));
    }
    /* reduce16 returns lane i = sum of acc[REDUCE16_SOURCE[i]]: feed it the keys in that order */
    __m512 src[16];
    for (int i2 = 0; i2 < 16; i2++)
        src[REDUCE16_SOURCE[i2]] = acc[i2];
    return reduce16(src);
}
#endif

#define ATT_TILE 32 /* keys per tile of the weighted sum over V: 16 KiB of values at D = 128, in L1 */

/* The heads [g0, g1) of KV head kvh of batch row b: every key and value row is read once for all
 * of them (G heads re-reading a KV head each made a long context a cache-miss stream). */
static void attention_heads(const float *q, const float *kb, const float *vb, const uint8_t *mask, float *out,
                            float *p, int64_t g0, int64_t g1, int64_t h0, int64_t S, int64_t D, int64_t sqh,
                            int64_t sks, int64_t svs, float scale) {
    const int64_t nh = g1 - g0;
    for (int64_t s0 = 0; s0 < S; s0 += 16) { /* 16 keys a step: one reduction for 16 scores where all are visible */
        const int64_t s1 = s0 + 16 < S ? s0 + 16 : S;
        int visible = 0;
        for (int64_t j = s0; j < s1; j++)
            visible += !mask || mask[j];
#if defined(__AVX512F__)
        if (visible == 16) {
            for (int64_t g = 0; g < nh; g++)
                _mm512_storeu_ps(p + g * S + s0, _mm512_mul_ps(dot16_keys(q + (h0 + g) * sqh, kb + s0 * sks, sks, D),
                                                               _mm512_set1_ps(scale)));
            continue;
        }
#endif
        for (int64_t j = s0; j < s1; j++)
            for (int64_t g = 0; g < nh; g++)
                p[g * S + j] = visible && (!mask || mask[j]) ? dot_lanes(q + (h0 + g) * sqh, kb + j * sks, D) * scale
                                                              : -INFINITY;
    }
    int64_t s;
    float inv[nh];
    for (int64_t g = 0; g < nh; g++) {
        float *pg = p + g * S, top = -INFINITY, sum = 0.0f;
        float most[16]; /* the max in 16 lanes too (exact in any order) */
        for (int j = 0; j < 16; j++)
            most[j] = -INFINITY;
        for (s = 0; s + 16 <= S; s += 16)
            for (int j = 0; j < 16; j++)
                most[j] = pg[s + j] > most[j] ? pg[s + j] : most[j];
        for (; s < S; s++)
            top = pg[s] > top ? pg[s] : top;
        for (int j = 0; j < 16; j++)
            top = most[j] > top ? most[j] : top;
        for (s = 0; s < S; s++) /* exp_approx vectorizes where libm's expf is a call a key */
            pg[s] = pg[s] == -INFINITY ? 0.0f : exp_approx(pg[s] - top);
        float lanes[16] = {0}; /* the weights' sum in 16 lanes (vectorizes), then the lanes as a tree */
        for (s = 0; s + 16 <= S; s += 16)
            for (int j = 0; j < 16; j++)
                lanes[j] += pg[s + j];
        for (int j = 0; s + j < S; j++)
            lanes[j] += pg[s + j];
        for (int w = 8; w >= 1; w /= 2)
            for (int j = 0; j < w; j++)
                lanes[j] += lanes[j + w];
        sum = lanes[0];
        inv[g] = 1.0f / sum;
        for (int64_t d = 0; d < D; d++)
            out[(h0 + g) * D + d] = 0.0f;
    }
    for (int64_t t0 = 0; t0 < S; t0 += ATT_TILE) { /* o += e * v, key after key, a tile at a time */
        const int64_t t1 = t0 + ATT_TILE < S ? t0 + ATT_TILE : S;
        for (int64_t g = 0; g < nh; g++) {
            const float *pg = p + g * S;
            float *o = out + (h0 + g) * D;
            for (int64_t d0 = 0; d0 < D; d0 += 128) {
                const int64_t n = D - d0 < 128 ? D - d0 : 128;
                float acc[128];
                memcpy(acc, o + d0, (size_t)n * sizeof(float));
                for (s = t0; s < t1; s++) {
                    const float e = pg[s];
                    if (e == 0.0f)
                        continue;
                    const float *vr = vb + s * svs + d0;
                    for (int64_t d = 0; d < n; d++)
                        acc[d] += e * vr[d];
                }
                memcpy(o + d0, acc, (size_t)n * sizeof(float));
            }
        }
    }
    for (int64_t g = 0; g < nh; g++)
        for (int64_t d = 0; d < D; d++)
            out[(h0 + g) * D + d] *= inv[g];
}

/* Work items: (batch row, KV head, group of its G query heads), the groups cut so that there are
 * at least as many items as threads (a full layer of 26B-A4B has one KV head for 16 query heads). */
int64_t lr_decode_attention_scratch(int64_t B, int64_t N, int64_t KV, int64_t S, int threads) {
    return (N / KV) * S * (threads > 1 ? threads : 1);
}

void lr_decode_attention(const float *q, const float *k, const float *v, const uint8_t *mask, float *out,
                         float *scratch, int64_t B, int64_t N, int64_t KV, int64_t S, int64_t D, int64_t sqb,
                         int64_t sqh, int64_t skb, int64_t skh, int64_t sks, int64_t svb, int64_t svh, int64_t svs,
                         float scale) {
    const int64_t G = N / KV;
    const int threads = omp_get_max_threads();
    const int parallel = threads > 1 && B * N * S * D >= PARALLEL_MIN;
    int64_t split = parallel ? (threads + B * KV - 1) / (B * KV) : 1;
    split = split > G ? G : split;
    const int64_t per = (G + split - 1) / split;
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t item = 0; item < B * KV * split; item++) {
        const int64_t bk = item / split, part = item % split, b = bk / KV, kvh = bk % KV;
        const int64_t g0 = part * per, g1 = g0 + per < G ? g0 + per : G;
        if (g0 >= g1)
            continue;
        attention_heads(q + b * sqb, k + b * skb + kvh * skh, v + b * svb + kvh * svh, mask, out + b * N * D,
                        scratch + (int64_t)omp_get_thread_num() * G * S, g0, g1, kvh * G + g0, S, D, sqh, sks, svs,
                        scale);
    }
}

/* ---------------------------------------------------------------------------------------------
 * One decoded token through the front of a Gemma 4 MoE layer, in one call: everything but the
 * routed experts and the final FFN glue (lr_ffn_residual). The same C functions the unfused fp32
 * decode calls one by one, in the same order on the same buffers, so the results are bit for bit
 * those of DecoderLayer.forward_fused on the CPU; what goes is the ~25 Python calls between them.
 *
 *   n = rms_norm(x) * w_in; q|k|v = n @ qkv^T; q, k = rope(rms_norm(q|k) * w_qn|w_kn); v = rms_norm(v)
 *   k, v -> cache slot `slot`; a = attention(q, cache keys [0, n_keys)); o = a @ o^T
 *   res, x_mlp, x_moe, x_router = attention_residual_norms(o, x)
 *   ids, w = route(x_router @ router^T); h = down(act(gate(x_mlp)) * up(x_mlp))
 *
 * K = V layers (has_v 0) take v from k's projection before its norm and RoPE. Sliding layers pass
 * their ring (window > 0, kpos the slots' positions, -1 empty) and see the slots within the window
 * of `position` when the ring holds more than the window; full layers pass window 0.
 * ------------------------------------------------------------------------------------------- */
typedef struct {
    int64_t H, N, KV, D, has_v, I, E, K;
    float eps, router_root;
    int64_t act;
    const float *w_in, *w_qn, *w_kn, *w_post, *w_mlp, *w_moe, *w_router_scale, *expert_scale;
    const uint16_t *qkv, *o, *gate_up, *down, *router;
    const float *qkv_bias, *o_bias;
} lr_layer;

int64_t lr_decode_layer_scratch(const lr_layer *L, int64_t max_keys, int threads) {
    const int64_t width = (L->N + (L->has_v ? 2 : 1) * L->KV) * L->D;
    return width + 2 * L->N * L->D + 6 * L->H + 2 * L->E + 3 * L->I
           + lr_decode_attention_scratch(1, L->N, L->KV, max_keys, threads) + max_keys / 4 + 16;
}

/* gate_up [2I] -> a [I] = act(gate) * up, as torch computes the dense MLP's act(gate) * up. */
void lr_gated(const float *gate_up, float *a, int64_t rows, int64_t I, int act) {
    for (int64_t r = 0; r < rows; r++)
        gated(gate_up + r * 2 * I, gate_up + r * 2 * I + I, a + r * I, I, act);
}

/* One decoded token's attention over its layer's cache (K/V [KV, slots, D], the token's K/V already in
 * `slot`): a sliding layer records the slot's position in kpos and, when the ring holds more keys than
 * the window, masks those outside it (mask: n_keys bytes of scratch). */
static void attend_token(const float *q, const float *kc, const float *vc, int64_t *kpos, uint8_t *mask, float *att,
                         float *att_scratch, int64_t N, int64_t KV, int64_t D, int64_t slots, int64_t slot,
                         int64_t n_keys, int64_t position, int64_t window, float scale) {
    const uint8_t *visible = NULL;
    if (window > 0) {
        kpos[slot] = position;
        if (n_keys > window) {
            for (int64_t s = 0; s < n_keys; s++)
                mask[s] = kpos[s] >= 0 && kpos[s] <= position && kpos[s] > position - window;
            visible = mask;
        }
    }
    lr_decode_attention(q, kc, vc, visible, att, att_scratch, 1, N, KV, n_keys, D, N * D, D, KV * slots * D,
                        slots * D, D, KV * slots * D, slots * D, D, scale);
}

int lr_decode_layer(const lr_layer *L, const float *x, const float *cos, const float *sin, float *kc, float *vc,
                    int64_t *kpos, int64_t slots, int64_t slot, int64_t n_keys, int64_t position, int64_t window,
                    float *res, float *h_mlp, float *x_moe, int64_t *ids, float *w, float *scratch, int64_t n_scratch,
                    int threads) {
    const int64_t H = L->H, N = L->N, KV = L->KV, D = L->D, I = L->I, E = L->E;
    const int64_t width = (N + (L->has_v ? 2 : 1) * KV) * D;
    if (slot < 0 || slot >= slots || n_keys < 1 || n_keys > slots)
        return -1;
    if (lr_decode_layer_scratch(L, n_keys, threads) > n_scratch)
        return -2;
    float *qkv = scratch, *q = qkv + width, *att = q + N * D, *n_in = att + N * D, *o = n_in + H;
    float *x_mlp = o + H, *x_router = x_mlp + H, *logits = x_router + H, *p = logits + E, *gu = p + E;
    float *a = gu + 2 * I, *att_scratch = a + I;
    uint8_t *mask = (uint8_t *)(att_scratch + lr_decode_attention_scratch(1, N, KV, n_keys, threads));

    lr_rms_norm(x, L->w_in, n_in, 1, 1, H, H, L->eps);
    lr_linear(n_in, L->qkv, L->qkv_bias, qkv, 1, H, width);
    lr_rms_norm_rope(qkv, L->w_qn, cos, sin, q, N, N, width, 1, D, L->eps);
    float *k_new = att; /* KV * D floats, free until the attention writes there */
    lr_rms_norm_rope(qkv + N * D, L->w_kn, cos, sin, k_new, KV, KV, width, 1, D, L->eps);
    for (int64_t h = 0; h < KV; h++)
        memcpy(kc + (h * slots + slot) * D, k_new + h * D, (size_t)D * sizeof(float));
    const float *v_src = qkv + (L->has_v ? N + KV : N) * D;
    for (int64_t h = 0; h < KV; h++) /* weightless RMSNorm straight into the cache slot */
        lr_rms_norm(v_src + h * D, NULL, vc + (h * slots + slot) * D, 1, 1, D, D, L->eps);
    attend_token(q, kc, vc, kpos, mask, att, att_scratch, N, KV, D, slots, slot, n_keys, position, window, 1.0f);
    lr_linear(att, L->o, L->o_bias, o, 1, N * D, H);
    lr_attention_residual_norms(o, L->w_post, x, L->w_mlp, L->w_moe, L->w_router_scale, res, x_mlp, x_moe, x_router,
                                1, H, L->eps, L->router_root);
    lr_linear(x_router, L->router, NULL, logits, 1, H, E);
    lr_route(logits, L->expert_scale, ids, w, 1, E, L->K, p);
    lr_linear(x_mlp, L->gate_up, NULL, gu, 1, H, 2 * I);
    gated(gu, gu + I, a, I, (int)L->act);
    lr_linear(a, L->down, NULL, h_mlp, 1, I, H);
    return 0;
}

/* A layer's routed experts as lr_decode_layer_full reads them: kind 0, bf16 gate_up [E, 2F, H] and
 * down [E, H, F] (lr_moe_one_token); kind 1, 4-bit rows (lr_moe_4bit: rows, offsets, the code tables). */
typedef struct {
    int64_t kind, E, F, blocksize, dq;
    const uint16_t *gate_up, *down;
    const uint8_t *const *rows;
    const int64_t *offsets;
    const float *table, *dyn;
    const float *w_post1, *w_post2, *w_post; /* lr_ffn_residual's norms */
    float scalar;
} lr_experts;

#define EVEN(n) (((n) + 1) & ~(int64_t)1) /* float counts kept even: int64 arrays after them stay aligned */

/* The expert kernel's own scratch, as the Python wrappers size it (so it picks the same thread count). */
static int64_t experts_scratch(int64_t H, int64_t K, const lr_experts *X, int threads) {
    const int64_t t = threads > 1 ? threads : 1;
    if (X->kind == 0)
        return t * (2 * H + 2 * X->F);
    return lr_moe_4bit_scratch(1, K, H, X->F, X->blocksize, (int)X->dq, (int)t);
}

static int64_t experts_kernel_scratch(const lr_layer *L, const lr_experts *X, int threads) {
    return experts_scratch(L->H, L->K, X, threads);
}

/* One token's routed experts (x [H], ids and w [K]) into moe [H], with the kernel the Python wrappers
 * call (kernels.moe, kernels.moe_q4) and its scratch (xs floats at xsc): 0, -3 (an expert id out of
 * range or absent) or -4 (the 4-bit kernel refused the shapes). */
static int run_experts(const lr_experts *X, const float *x, const int64_t *ids, const float *w, int64_t K, int64_t H,
                       int act, float *moe, int64_t *order, int64_t *starts, float *xsc, int64_t xs) {
    int status;
    if (X->kind == 0)
        status = lr_moe_one_token(x, X->gate_up, X->down, ids, w, K, X->E, H, X->F, act, moe, xsc, xs);
    else
        status = lr_moe_4bit(x, X->rows, X->offsets, X->table, X->dyn, ids, w, 1, K, X->E, H, X->F, X->blocksize,
                             (int)X->dq, act, moe, order, starts, xsc, xs);
    return status == 0 ? 0 : status == -1 ? -3 : -4;
}

int64_t lr_decode_layer_full_scratch(const lr_layer *L, const lr_experts *X, int64_t max_keys, int threads) {
    return EVEN(lr_decode_layer_scratch(L, max_keys, threads)) + EVEN(5 * L->H) + 2 * L->K /* ids */
           + EVEN(L->K) + 2 * (L->K + X->E + 1) /* order, starts */ + experts_kernel_scratch(L, X, threads);
}

/* The whole layer for one token: lr_decode_layer, the routed experts, lr_ffn_residual; out [H] is the
 * layer's output (may not alias x). The calls and buffers of DecoderLayer.forward_decode, in one.
 * Returns lr_decode_layer's codes, -3 (an expert id out of range or absent), -4 (the expert kernel
 * refused the shapes). */
int lr_decode_layer_full(const lr_layer *L, const lr_experts *X, const float *x, const float *cos, const float *sin,
                         float *kc, float *vc, int64_t *kpos, int64_t slots, int64_t slot, int64_t n_keys,
                         int64_t position, int64_t window, float *out, float *scratch, int64_t n_scratch, int threads) {
    const int64_t H = L->H, K = L->K;
    const int64_t front = EVEN(lr_decode_layer_scratch(L, n_keys, threads)), xs = experts_kernel_scratch(L, X, threads);
    if (lr_decode_layer_full_scratch(L, X, n_keys, threads) > n_scratch)
        return -2;
    float *res = scratch + front, *h = res + H, *x_moe = h + H, *moe = x_moe + H, *tmp = moe + H;
    int64_t *ids = (int64_t *)(scratch + front + EVEN(5 * H));
    float *w = (float *)(ids + K);
    int64_t *order = (int64_t *)(w + EVEN(K)), *starts = order + K;
    float *xsc = (float *)(starts + X->E + 1);
    int status = lr_decode_layer(L, x, cos, sin, kc, vc, kpos, slots, slot, n_keys, position, window, res, h, x_moe,
                                 ids, w, scratch, front, threads);
    if (status != 0)
        return status;
    status = run_experts(X, x_moe, ids, w, K, H, (int)L->act, moe, order, starts, xsc, xs);
    if (status != 0)
        return status;
    lr_ffn_residual(h, X->w_post1, moe, X->w_post2, X->w_post, res, X->scalar, out, tmp, 1, H, L->eps);
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * One decoded token through a Qwen3-MoE or Mixtral MoE layer (qwen3_moe.DecoderLayer), in one call:
 * the C functions the module path calls one by one on the CPU in fp32, in the same order, so the
 * results are its results bit for bit.
 *
 *   n = rms_norm(x) * w_in; q|k|v = n @ qkv^T (+ bias); q, k = rope(rms_norm(q|k) * w_qn|w_kn)
 *   (qk_norm; Mixtral: rope(q|k)); k, v -> cache slot `slot`; a = attention(q, cache keys
 *   [0, n_keys)) * scale; res = x + (a @ o^T (+ o_bias)); h = rms_norm(res) * w_post;
 *   ids, w = top-k(softmax(h @ router^T)) (renormalised when norm_topk); out = res + experts(h)
 *
 * Sliding layers (every layer, where the config slides) pass their ring as lr_decode_layer does.
 * ------------------------------------------------------------------------------------------- */
typedef struct {
    int64_t H, N, KV, D, E, K, qk_norm, norm_topk, act;
    float eps, scale; /* scale: the attention's (D^-0.5, times YaRN's m^2) */
    const float *w_in, *w_qn, *w_kn, *w_post; /* w_qn, w_kn: NULL without qk_norm */
    const uint16_t *qkv, *o, *router;
    const float *qkv_bias, *o_bias; /* NULL without attention_bias */
} lr_moe_layer;

/* RoPE of `rows` heads of D values (contiguous), as apply_rope computes it in torch: x * cos +
 * roll(x, D/2) * sin, each product and the sum rounded (no FMA contraction under -std=c11). */
static void rope_heads(const float *x, const float *cos, const float *sin, float *out, int64_t rows, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * D;
        float *o = out + r * D;
        for (int64_t d = 0; d < half; d++) {
            const float lo = xr[d], hi = xr[d + half];
            o[d] = lo * cos[d] + hi * sin[d];
            o[d + half] = hi * cos[d + half] + lo * sin[d + half];
        }
    }
}

int64_t lr_moe_decode_layer_scratch(const lr_moe_layer *L, int64_t max_keys, int threads) {
    return (L->N + 2 * L->KV) * L->D + 2 * L->N * L->D + 2 * L->H + 2 * L->E
           + lr_decode_attention_scratch(1, L->N, L->KV, max_keys, threads) + max_keys / 4 + 16;
}

/* The layer up to its routed experts: res [H] (the residual after attention), x_moe [H] (the
 * experts' input), ids and w [K]. Returns 0, -1 (slot or key count out of range), -2 (scratch). */
int lr_moe_decode_layer(const lr_moe_layer *L, const float *x, const float *cos, const float *sin, float *kc, float *vc,
                        int64_t *kpos, int64_t slots, int64_t slot, int64_t n_keys, int64_t position, int64_t window,
                        float *res, float *x_moe, int64_t *ids, float *w, float *scratch, int64_t n_scratch,
                        int threads) {
    const int64_t H = L->H, N = L->N, KV = L->KV, D = L->D, E = L->E;
    const int64_t width = (N + 2 * KV) * D;
    if (slot < 0 || slot >= slots || n_keys < 1 || n_keys > slots)
        return -1;
    if (lr_moe_decode_layer_scratch(L, n_keys, threads) > n_scratch)
        return -2;
    float *qkv = scratch, *q = qkv + width, *att = q + N * D, *n_in = att + N * D, *o = n_in + H, *logits = o + H;
    float *p = logits + E, *att_scratch = p + E;
    uint8_t *mask = (uint8_t *)(att_scratch + lr_decode_attention_scratch(1, N, KV, n_keys, threads));

    lr_rms_norm(x, L->w_in, n_in, 1, 1, H, H, L->eps);
    lr_linear(n_in, L->qkv, L->qkv_bias, qkv, 1, H, width);
    float *k_new = att; /* KV * D floats, free until the attention writes there */
    if (L->qk_norm) {
        lr_rms_norm_rope(qkv, L->w_qn, cos, sin, q, N, N, width, 1, D, L->eps);
        lr_rms_norm_rope(qkv + N * D, L->w_kn, cos, sin, k_new, KV, KV, width, 1, D, L->eps);
    } else {
        rope_heads(qkv, cos, sin, q, N, D);
        rope_heads(qkv + N * D, cos, sin, k_new, KV, D);
    }
    for (int64_t h = 0; h < KV; h++) {
        memcpy(kc + (h * slots + slot) * D, k_new + h * D, (size_t)D * sizeof(float));
        memcpy(vc + (h * slots + slot) * D, qkv + (N + KV + h) * D, (size_t)D * sizeof(float));
    }
    attend_token(q, kc, vc, kpos, mask, att, att_scratch, N, KV, D, slots, slot, n_keys, position, window, L->scale);
    lr_linear(att, L->o, L->o_bias, o, 1, N * D, H);
    for (int64_t i = 0; i < H; i++)
        res[i] = x[i] + o[i];
    lr_rms_norm(res, L->w_post, x_moe, 1, 1, H, H, L->eps);
    lr_linear(x_moe, L->router, NULL, logits, 1, H, E);
    lr_route_top_k(logits, ids, w, 1, E, L->K, (int)L->norm_topk, p);
    return 0;
}

int64_t lr_moe_decode_layer_full_scratch(const lr_moe_layer *L, const lr_experts *X, int64_t max_keys, int threads) {
    return EVEN(lr_moe_decode_layer_scratch(L, max_keys, threads)) + EVEN(3 * L->H) + 2 * L->K /* ids */
           + EVEN(L->K) + 2 * (L->K + X->E + 1) /* order, starts */ + experts_scratch(L->H, L->K, X, threads);
}

/* The whole layer for one token: lr_moe_decode_layer, the routed experts, the residual; out [H] may
 * not alias x. Returns lr_moe_decode_layer's codes or run_experts'. */
int lr_moe_decode_layer_full(const lr_moe_layer *L, const lr_experts *X, const float *x, const float *cos,
                             const float *sin, float *kc, float *vc, int64_t *kpos, int64_t slots, int64_t slot,
                             int64_t n_keys, int64_t position, int64_t window, float *out, float *scratch,
                             int64_t n_scratch, int threads) {
    const int64_t H = L->H, K = L->K;
    const int64_t front = EVEN(lr_moe_decode_layer_scratch(L, n_keys, threads));
    const int64_t xs = experts_scratch(H, K, X, threads);
    if (lr_moe_decode_layer_full_scratch(L, X, n_keys, threads) > n_scratch)
        return -2;
    float *res = scratch + front, *x_moe = res + H, *moe = x_moe + H;
    int64_t *ids = (int64_t *)(scratch + front + EVEN(3 * H));
    float *w = (float *)(ids + K);
    int64_t *order = (int64_t *)(w + EVEN(K)), *starts = order + K;
    float *xsc = (float *)(starts + X->E + 1);
    int status = lr_moe_decode_layer(L, x, cos, sin, kc, vc, kpos, slots, slot, n_keys, position, window, res, x_moe,
                                     ids, w, scratch, front, threads);
    if (status != 0)
        return status;
    status = run_experts(X, x_moe, ids, w, K, H, (int)L->act, moe, order, starts, xsc, xs);
    if (status != 0)
        return status;
    for (int64_t i = 0; i < H; i++)
        out[i] = res[i] + moe[i];
    return 0;
}

/* logits[V] = tanh((x @ W^T) / cap) * cap (cap > 0; else the plain products), tanh from exp_approx
 * (1 - 2 / (exp(2u) + 1)), which vectorizes where libm's tanhf is a call per value. */
void lr_logits(const float *x, const uint16_t *W, float *y, int64_t T, int64_t H, int64_t V, float cap) {
    lr_linear(x, W, NULL, y, T, H, V);
    if (cap > 0.0f)
        for (int64_t i = 0; i < T * V; i++) {
            const float u = y[i] / cap;
            y[i] = (1.0f - 2.0f / (exp_approx(2.0f * u) + 1.0f)) * cap;
        }
}

/* One position's RoPE rows as Gemma4Model.rope builds them: f = position * inv[i] (fp32), cos and
 * sin of [f, f] (D = 2n values), sin's first half negated. libm's cosf/sinf, where torch's vectorized
 * ones may differ in the last bit. */
void lr_rope_row(const float *inv, int64_t n, int64_t position, float *cos_out, float *sin_out) {
    const float p = (float)position;
    for (int64_t i = 0; i < n; i++) {
        const float f = p * inv[i], c = cosf(f), s = sinf(f);
        cos_out[i] = cos_out[i + n] = c;
        sin_out[i] = -s;
        sin_out[i + n] = s;
    }
}

/* out[t][i] = W[ids[t]][i] (bf16, widened) * scale: the scaled token embedding of fp32 decode. */
int lr_embed(const uint16_t *W, const int64_t *ids, int64_t T, int64_t V, int64_t H, float scale, float *out) {
    for (int64_t t = 0; t < T; t++) {
        if (ids[t] < 0 || ids[t] >= V)
            return -1;
        const uint16_t *row = W + ids[t] * H;
        for (int64_t i = 0; i < H; i++)
            out[t * H + i] = bf16_to_f32(row[i]) * scale;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------
 * 4-bit blockwise quantization, value for value what bitsandbytes computes on the CPU (its
 * torch implementation, backends/default quantize_4bit), in one pass instead of ~10 tensor passes
 * and a bucketize (~7 M weights/s on one Zen 5 core there; the loader quantizes every routed expert
 * of a bf16 checkpoint on the CPU this way).
 *
 * a: n values (fp32, or bf16 when is_bf16), blocks of `blocksize`, the last one possibly partial.
 * Per block absmax = max |a| (NaN wins, as torch.max), m = max(absmax, 1e-38) (NaN kept, as
 * torch.clamp); a full block scales by the reciprocal, v = a * (1 / m), the partial one divides,
 * v = a / m (bitsandbytes' two expressions: they round differently), and stores m for it. The code of v is the number
 * of the 15 midpoints between sorted code values that lie below it (torch.bucketize, right=False;
 * NaN: 15; clamping v to [-1, 1] first, as bitsandbytes does, changes no count), mapped through
 * order[16] (FP4's codes are not sorted; NF4's order is the identity). Two codes a byte, the first
 * in the high nibble; an odd n pads one code of 0.0. absmax[n_blocks] out.
 * ------------------------------------------------------------------------------------------- */
static inline float q4_in(const void *a, int is_bf16, int64_t i) {
    return is_bf16 ? bf16_to_f32(((const uint16_t *)a)[i]) : ((const float *)a)[i];
}

static inline uint8_t q4_bucket(float v, const float *bounds, const uint8_t *order) {
    int c = 0;
    for (int b = 0; b < 15; b++)
        c += v > bounds[b];
    return order[v != v ? 15 : c];
}

#if defined(__AVX512F__)
static inline __m512 q4_load16(const void *a, int is_bf16, int64_t i) {
    return is_bf16 ? load_bf16((const uint16_t *)a + i, 0xFFFF) : _mm512_loadu_ps((const float *)a + i);
}

/* A full block whose size is a multiple of 16: absmax (NaN if any value is NaN: vmaxps alone would
 * drop it), then 16 codes a step, packed into 8 bytes. */
static float q4_quantize_block_avx512(const void *a, int is_bf16, int64_t start, int64_t len, const float *bounds,
                                      const uint8_t *order, uint8_t *out) {
    __m512 mx = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int64_t i = 0; i < len; i += 16) {
        __m512 x = q4_load16(a, is_bf16, start + i);
        nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        mx = _mm512_max_ps(mx, _mm512_abs_ps(x));
    }
    float am = nan ? NAN : _mm512_reduce_max_ps(mx);
    float m = am < 1e-38f ? 1e-38f : am;
    __m512 r = _mm512_set1_ps(1.0f / m);
    __m512 bnd[15];
    for (int b = 0; b < 15; b++)
        bnd[b] = _mm512_set1_ps(bounds[b]);
    int32_t ord32[16];
    for (int c = 0; c < 16; c++)
        ord32[c] = order[c];
    __m512i ord = _mm512_loadu_si512(ord32), one = _mm512_set1_epi32(1), last = _mm512_set1_epi32(15);
    for (int64_t i = 0; i < len; i += 16) {
        __m512 v = _mm512_mul_ps(q4_load16(a, is_bf16, start + i), r);
        __m512i c = _mm512_setzero_si512();
        for (int b = 0; b < 15; b++)
            c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(v, bnd[b], _CMP_GT_OQ), c, one);
        c = _mm512_mask_mov_epi32(c, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), last);
        c = _mm512_permutexvar_epi32(c, ord);
        /* lanes 2j and 2j + 1 share a 64-bit lane: its low byte becomes (code 2j << 4) | code 2j + 1 */
        __m512i pair = _mm512_or_si512(_mm512_slli_epi64(c, 4), _mm512_srli_epi64(c, 32));
        _mm_storel_epi64((__m128i *)(out + i / 2), _mm512_cvtepi64_epi8(pair));
    }
    return am;
}
#endif

void lr_quantize_4bit(const void *a, int is_bf16, int64_t n, int64_t blocksize, const float *bounds,
                      const uint8_t *order, uint8_t *packed, float *absmax) {
    int64_t blocks = (n + blocksize - 1) / blocksize;
    int64_t pairs = blocksize / 2;
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t start = blk * blocksize, len = n - start < blocksize ? n - start : blocksize;
        uint8_t *out = packed + start / 2;
#if defined(__AVX512F__)
        if (len == blocksize && blocksize % 16 == 0) {
            absmax[blk] = q4_quantize_block_avx512(a, is_bf16, start, len, bounds, order, out);
            continue;
        }
#endif
        float am = 0.0f;
        for (int64_t i = 0; i < len; i++) {
            float x = fabsf(q4_in(a, is_bf16, start + i));
            am = (x > am || x != x) && am == am ? x : am;
        }
        float m = am < 1e-38f ? 1e-38f : am;
        float r = 1.0f / m;
        int full = len == blocksize;
        absmax[blk] = full ? am : m; /* bitsandbytes stores the partial block's clamped */
        if (full) {
            for (int64_t p = 0; p < pairs; p++) {
                float v0 = q4_in(a, is_bf16, start + 2 * p) * r, v1 = q4_in(a, is_bf16, start + 2 * p + 1) * r;
                out[p] = (uint8_t)(q4_bucket(v0, bounds, order) << 4 | q4_bucket(v1, bounds, order));
            }
        } else {
            for (int64_t p = 0; 2 * p < len; p++) {
                float v0 = q4_in(a, is_bf16, start + 2 * p) / m;
                float v1 = 2 * p + 1 < len ? q4_in(a, is_bf16, start + 2 * p + 1) / m : 0.0f;
                out[p] = (uint8_t)(q4_bucket(v0, bounds, order) << 4 | q4_bucket(v1, bounds, order));
            }
        }
    }
}
