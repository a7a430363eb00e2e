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

#if defined(__AVX512F__)
static inline __m512 load_bf16(const uint16_t *p, __mmask16 m) {
    __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* y[r] = dot(x, W[r]) for r in [r0, r1); W row-major with I columns. The masked tail is a step of
 * its own: a per-step mask in this loop (as in dot_rows_4tokens) made decode ~10% slower. */
static void dot_rows(const float *x, const uint16_t *W, float *y, int64_t I, int64_t r0, int64_t r1) {
    const int64_t full = I & ~(int64_t)15;
    const __mmask16 tail = (__mmask16)((1u << (I - full)) - 1u);
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
        const uint16_t *w0 = W + r * I, *w1 = w0 + I, *w2 = w1 + I, *w3 = w2 + I;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t i = 0; i < full; i += 16) {
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
