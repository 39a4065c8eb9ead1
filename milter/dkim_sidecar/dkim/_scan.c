/*
 * dkim_sidecar.dkim._scan: the body's hot loops, in C.
 *
 * edge() answers, per chunk, the two questions the session's edge asks: is there a bare LF to
 * turn into CRLF, and a line over 998 octets (RFC 5322 section 2.1.1)? relax() does the
 * whitespace part of relaxed body canonicalization (RFC 6376 section 3.4.4 a and b), and hands
 * back the very object it was given when nothing changes (the common case for base64 and most
 * prose): no copy. canon.py / edge.py keep a pure-Python path that gives the same answers
 * (the tests compare both).
 *
 * On x86-64 both look at 64-octet blocks, 16 octets per SSE2 instruction: SSE2 is part of the
 * x86-64 baseline, so no -march flag is needed and the image runs on any x86-64 CPU. Both also
 * come in an AVX2 version (32 octets per instruction), compiled into functions of their own
 * (target attribute) and chosen at import when the CPU has AVX2. Elsewhere (arm64, ...) a
 * portable path works on 8-octet words (SWAR); edge() takes it on x86-64 too for a line limit
 * under a block (only the tests ask for one). DKIM_SCAN_NO_AVX2 and DKIM_SCAN_PORTABLE build
 * the other paths on x86-64: the tests compare every one with the pure-Python path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__SSE2__) && !defined(DKIM_SCAN_PORTABLE)
#define SCAN_SSE2 1
#include <emmintrin.h>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(DKIM_SCAN_NO_AVX2)
/* AVX2 code is compiled for its own functions only (target attribute) and chosen at import
   when the CPU has it: the module still loads and runs on any x86-64 CPU. */
#define SCAN_AVX2 1
#define AVX2_FN __attribute__((target("avx2")))
#include <immintrin.h>
#endif
#endif

#define F_BARE_LF 1   /* an LF not preceded by CR */
#define F_LONG_LINE 2 /* a line longer than `limit` octets before its CRLF */

#define BLOCK 64

#ifdef SCAN_AVX2
static int use_avx2; /* set at import: the CPU has AVX2 (and the OS saves its registers) */
#endif

/* 0x80 in each octet of x that equals c, 0 elsewhere (exact: no false positives). */
static inline uint64_t
eq_mask(uint64_t x, unsigned char c)
{
    const uint64_t low7 = 0x7F7F7F7F7F7F7F7FULL;
    const uint64_t t = x ^ (0x0101010101010101ULL * c);
    return ~(((t & low7) + low7) | t | low7);
}

/* Octet k of the word at p in bits 8k..8k+7, whatever the byte order. */
static inline uint64_t
load_word(const unsigned char *p)
{
    uint64_t x;
    memcpy(&x, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    x = __builtin_bswap64(x);
#endif
    return x;
}

/* The LF at index `at` (prev: the octet before p[0]): is it bare, how long was its line. */
static inline void
line_end(const unsigned char *p, Py_ssize_t at, unsigned char prev, Py_ssize_t *start,
         Py_ssize_t max_before_lf, int *flags)
{
    if ((at >= 1 ? p[at - 1] : prev) != '\r')
        *flags |= F_BARE_LF;
    if (at - *start > max_before_lf)
        *flags |= F_LONG_LINE;
    *start = at + 1;
}

/* The edge's two questions, eight octets at a time: most words of a body hold no LF and cost
   a few instructions; each LF found is looked at on its own. *start_io: where the current
   line started, relative to p (-line_len on entry), updated at each LF. */
static int
edge_words(const unsigned char *p, Py_ssize_t n, unsigned char prev, Py_ssize_t *start_io,
           Py_ssize_t max_before_lf)
{
    Py_ssize_t start = *start_io, i = 0;
    int flags = 0;
    for (; i + 8 <= n; i += 8)
        for (uint64_t m = eq_mask(load_word(p + i), '\n'); m; m &= m - 1)
            line_end(p, i + (__builtin_ctzll(m) >> 3), prev, &start, max_before_lf, &flags);
    for (; i < n; i++)
        if (p[i] == '\n')
            line_end(p, i, prev, &start, max_before_lf, &flags);
    *start_io = start;
    return flags;
}

#ifdef SCAN_SSE2

/* Bit k set when the octet k of the 64 at p is LF. */
static inline uint64_t
lf_mask(const unsigned char *p)
{
    const __m128i lf = _mm_set1_epi8('\n');
    uint64_t m = 0;
    for (int k = 0; k < BLOCK; k += 16) {
        const __m128i v = _mm_loadu_si128((const __m128i *)(p + k));
        m |= (uint64_t)(uint16_t)_mm_movemask_epi8(_mm_cmpeq_epi8(v, lf)) << k;
    }
    return m;
}

/* Whether the 64 octets at q may need relaxed canonicalization: an HTAB, an SP after SP, a CR
   after SP (SP CR LF; an SP before a bare CR stays, relax_octets decides). q[-1] must be
   readable: the octet before the block. Loading at q - 1 lines each octet up with the one
   before it, so the test stays in vector registers: one movemask per block. */
static inline int
relax_candidates(const unsigned char *q)
{
    const __m128i sp = _mm_set1_epi8(' '), cr = _mm_set1_epi8('\r'), tab = _mm_set1_epi8('\t');
    __m128i any = _mm_setzero_si128();
    for (int k = 0; k < BLOCK; k += 16) {
        const __m128i v = _mm_loadu_si128((const __m128i *)(q + k));
        const __m128i before = _mm_loadu_si128((const __m128i *)(q + k - 1));
        const __m128i sp_or_cr = _mm_or_si128(_mm_cmpeq_epi8(v, sp), _mm_cmpeq_epi8(v, cr));
        any = _mm_or_si128(any, _mm_cmpeq_epi8(v, tab));
        any = _mm_or_si128(any, _mm_and_si128(_mm_cmpeq_epi8(before, sp), sp_or_cr));
    }
    return _mm_movemask_epi8(any) != 0;
}

/* The edge's look at the 64 octets at q (q[-1] readable, as above): *bare is set when an LF
   does not follow a CR; returns whether the block holds an LF at all. */
static inline int
edge_block(const unsigned char *q, int *bare)
{
    const __m128i lf = _mm_set1_epi8('\n'), cr = _mm_set1_epi8('\r');
    __m128i lfs = _mm_setzero_si128(), bad = _mm_setzero_si128();
    for (int k = 0; k < BLOCK; k += 16) {
        const __m128i is_lf = _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(q + k)), lf);
        const __m128i before = _mm_loadu_si128((const __m128i *)(q + k - 1));
        lfs = _mm_or_si128(lfs, is_lf);
        bad = _mm_or_si128(bad, _mm_andnot_si128(_mm_cmpeq_epi8(before, cr), is_lf));
    }
    if (!_mm_movemask_epi8(lfs))
        return 0;
    if (_mm_movemask_epi8(bad))
        *bare = 1;
    return 1;
}

#ifdef SCAN_AVX2
/* The same two, 32 octets per instruction. */
AVX2_FN static inline int
relax_candidates_avx2(const unsigned char *q)
{
    const __m256i sp = _mm256_set1_epi8(' '), cr = _mm256_set1_epi8('\r');
    const __m256i tab = _mm256_set1_epi8('\t');
    __m256i any = _mm256_setzero_si256();
    for (int k = 0; k < BLOCK; k += 32) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(q + k));
        const __m256i before = _mm256_loadu_si256((const __m256i *)(q + k - 1));
        const __m256i sp_or_cr =
            _mm256_or_si256(_mm256_cmpeq_epi8(v, sp), _mm256_cmpeq_epi8(v, cr));
        any = _mm256_or_si256(any, _mm256_cmpeq_epi8(v, tab));
        any = _mm256_or_si256(any, _mm256_and_si256(_mm256_cmpeq_epi8(before, sp), sp_or_cr));
    }
    return !_mm256_testz_si256(any, any);
}

AVX2_FN static inline int
edge_block_avx2(const unsigned char *q, int *bare)
{
    const __m256i lf = _mm256_set1_epi8('\n'), cr = _mm256_set1_epi8('\r');
    __m256i lfs = _mm256_setzero_si256(), bad = _mm256_setzero_si256();
    for (int k = 0; k < BLOCK; k += 32) {
        const __m256i is_lf =
            _mm256_cmpeq_epi8(_mm256_loadu_si256((const __m256i *)(q + k)), lf);
        const __m256i before = _mm256_loadu_si256((const __m256i *)(q + k - 1));
        lfs = _mm256_or_si256(lfs, is_lf);
        bad = _mm256_or_si256(bad, _mm256_andnot_si256(_mm256_cmpeq_epi8(before, cr), is_lf));
    }
    if (_mm256_testz_si256(lfs, lfs))
        return 0;
    if (!_mm256_testz_si256(bad, bad))
        *bare = 1;
    return 1;
}

#define RELAX_CANDIDATES(avx2, q) ((avx2) ? relax_candidates_avx2(q) : relax_candidates(q))
#define EDGE_BLOCK(avx2, q, bare) ((avx2) ? edge_block_avx2(q, bare) : edge_block(q, bare))
#else
#define RELAX_CANDIDATES(avx2, q) relax_candidates(q)
#define EDGE_BLOCK(avx2, q, bare) edge_block(q, bare)
#endif

#else /* portable: 8-octet words (SWAR) */

#define RELAX_CANDIDATES(avx2, q) relax_candidates(q)

/* As the SSE2 version, a word at a time (q[-1] readable). The 0x80 bit of octet k moves to
   octet k + 1 with << 8; the last octet's goes on to the next word. */
static inline int
relax_candidates(const unsigned char *q)
{
    uint64_t any = 0, before = q[-1] == ' ' ? 0x80 : 0;
    for (int w = 0; w < 8; w++) {
        const uint64_t x = load_word(q + 8 * w);
        const uint64_t sp = eq_mask(x, ' ');
        const uint64_t sp_before = (sp << 8) | before;
        any |= eq_mask(x, '\t') | (sp_before & (sp | eq_mask(x, '\r')));
        before = sp >> 56;
    }
    return any != 0;
}

#endif

/* The block at p + i such that q[-1] is the octet before it (`before` at i == 0): the data
   itself, or a copy, zero-padded when short (a NUL octet is none of SP, HTAB, CR, LF, so the
   padding adds no bits). pad holds BLOCK + 1 octets. */
static inline const unsigned char *
block_with_before(const unsigned char *p, Py_ssize_t i, Py_ssize_t n, unsigned char before,
                  unsigned char *pad)
{
    if (i > 0 && n - i >= BLOCK)
        return p + i;
    pad[0] = i > 0 ? p[i - 1] : before;
    memset(pad + 1, 0, BLOCK);
    memcpy(pad + 1, p + i, (size_t)(n - i < BLOCK ? n - i : BLOCK));
    return pad + 1;
}

#ifdef SCAN_SSE2
/* Index of the last LF in the block at p + i (which has one). */
static inline Py_ssize_t
last_lf_in(const unsigned char *p, Py_ssize_t i, Py_ssize_t n)
{
    unsigned char pad[BLOCK + 1];
    return i + 63 - __builtin_clzll(lf_mask(block_with_before(p, i, n, 0, pad)));
}

/* The edge's two questions only. Most blocks hold an LF (text lines are short), and no line
   inside a block can pass the limit (>= BLOCK here), so only the distance from the last
   block with an LF is watched; the exact LF positions are looked up when that distance
   could hide a line over the limit, and once at the end for the open line. */
static inline __attribute__((always_inline)) int
edge_core(const unsigned char *p, Py_ssize_t n, unsigned char prev, Py_ssize_t *start_io,
          Py_ssize_t max_before_lf, const int avx2)
{
    Py_ssize_t start = *start_io; /* exact while no LF was seen */
    Py_ssize_t last = -1;         /* the last block with an LF */
    unsigned char pad[BLOCK + 1];
    int bare = 0, flags = 0;
    for (Py_ssize_t i = 0; i < n; i += BLOCK) {
        const unsigned char *q = block_with_before(p, i, n, prev, pad);
        if (!EDGE_BLOCK(avx2, q, &bare))
            continue;
        /* the line ending at this block's first LF started after `last`'s LF */
        const Py_ssize_t earliest = last < 0 ? start : last + 1;
        if (i + BLOCK - 1 - earliest > max_before_lf) {
            if (last >= 0)
                start = last_lf_in(p, last, n) + 1;
            if (i + __builtin_ctzll(lf_mask(q)) - start > max_before_lf)
                flags |= F_LONG_LINE;
        }
        last = i;
    }
    if (last >= 0)
        start = last_lf_in(p, last, n) + 1;
    if (bare)
        flags |= F_BARE_LF;
    *start_io = start;
    return flags;
}

/* One copy of the loop per instruction set (the block functions inline into each). */
static int
edge_sse2(const unsigned char *p, Py_ssize_t n, unsigned char prev, Py_ssize_t *start_io,
          Py_ssize_t max_before_lf)
{
    return edge_core(p, n, prev, start_io, max_before_lf, 0);
}

#ifdef SCAN_AVX2
AVX2_FN static int
edge_avx2(const unsigned char *p, Py_ssize_t n, unsigned char prev, Py_ssize_t *start_io,
          Py_ssize_t max_before_lf)
{
    return edge_core(p, n, prev, start_io, max_before_lf, 1);
}
#endif
#endif

/*
 * edge(data, prev, line_len, limit) -> (flags, line_len)
 *   prev: the octet before data (0 at the start), so a CR ending one chunk pairs with the LF
 *         starting the next;
 *   line_len: octets of the current line seen before data;
 *   limit: the longest line allowed, CRLF excluded (998).
 * Returns BARE_LF and LONG_LINE as found, and the length of the line still open at the end
 * of data. A line is measured as if its LF followed a CR: a bare LF's line can be one octet
 * over once the LF becomes CRLF, which the caller asks again about the fixed chunk.
 */
static PyObject *
edge(PyObject *self, PyObject *args)
{
    Py_buffer view;
    int prev, flags;
    Py_ssize_t line_len, limit;
    if (!PyArg_ParseTuple(args, "y*inn", &view, &prev, &line_len, &limit))
        return NULL;
    /* a line's octets before its LF, CR included: the limit plus one for that CR */
    const Py_ssize_t max_before_lf = limit + 1;
    Py_ssize_t start = -line_len; /* index where the current line started */
    Py_BEGIN_ALLOW_THREADS
#ifdef SCAN_SSE2
    if (max_before_lf >= BLOCK) {
#ifdef SCAN_AVX2
        if (use_avx2)
            flags = edge_avx2(view.buf, view.len, (unsigned char)prev, &start, max_before_lf);
        else
#endif
            flags = edge_sse2(view.buf, view.len, (unsigned char)prev, &start, max_before_lf);
    } else
#endif
        flags = edge_words(view.buf, view.len, (unsigned char)prev, &start, max_before_lf);
    Py_END_ALLOW_THREADS
    const Py_ssize_t open_len = view.len - start;
    if (open_len > max_before_lf)
        flags |= F_LONG_LINE;
    PyBuffer_Release(&view);
    return Py_BuildValue("in", flags, open_len);
}

/* RFC 6376 section 3.4.4 a and b, one octet at a time from p[i] to p[end - 1]; out[-1] == SP
   exactly when the octet before p[i] was WSP (a WSP run is written as one SP, and that SP
   is taken back only at a CR LF), so no other state crosses calls. */
static inline unsigned char *
relax_octets(const unsigned char *p, Py_ssize_t i, Py_ssize_t end, Py_ssize_t n,
             unsigned char *o, const unsigned char *o0)
{
    for (; i < end; i++) {
        const unsigned char c = p[i];
        if (c == ' ' || c == '\t') {
            if (o == o0 || o[-1] != ' ')
                *o++ = ' '; /* a: a WSP run becomes one SP */
        } else if (c == '\r' && i + 1 < n && p[i + 1] == '\n') {
            if (o > o0 && o[-1] == ' ')
                o--; /* b: no WSP at the end of a line */
            *o++ = c;
        } else {
            *o++ = c;
        }
    }
    return o;
}

/* Index of the first block that may need a change, or n or more when none does. (The octet
   before the data is taken as not WSP: the data starts a line.) */
static inline __attribute__((always_inline)) Py_ssize_t
relax_find(const unsigned char *p, Py_ssize_t n, const int avx2)
{
    unsigned char pad[BLOCK + 1];
    Py_ssize_t i = 0;
    for (; i < n; i += BLOCK)
        if (RELAX_CANDIDATES(avx2, block_with_before(p, i, n, 0, pad)))
            break;
    return i;
}

/* Canonicalize p[i..n) into o (o0: the start of the output), from a block start; returns
   the end of the output. */
static inline __attribute__((always_inline)) unsigned char *
relax_from(const unsigned char *p, Py_ssize_t i, Py_ssize_t n, unsigned char *o,
           const unsigned char *o0, const int avx2)
{
    unsigned char pad[BLOCK + 1];
    for (; i < n; i += BLOCK) {
        /* A whole block copies as it is when it has no candidate and the octet before it
           was not WSP (then out[-1] != SP; a WSP before it would need its run carried on) */
        if (n - i >= BLOCK && (o == o0 || o[-1] != ' ') &&
            !RELAX_CANDIDATES(avx2, block_with_before(p, i, n, 0, pad))) {
            memcpy(o, p + i, BLOCK);
            o += BLOCK;
            continue;
        }
        o = relax_octets(p, i, i + BLOCK < n ? i + BLOCK : n, n, o, o0);
    }
    return o;
}

static Py_ssize_t
relax_find_base(const unsigned char *p, Py_ssize_t n)
{
    return relax_find(p, n, 0);
}

static unsigned char *
relax_from_base(const unsigned char *p, Py_ssize_t i, Py_ssize_t n, unsigned char *o,
                const unsigned char *o0)
{
    return relax_from(p, i, n, o, o0, 0);
}

#ifdef SCAN_AVX2
AVX2_FN static Py_ssize_t
relax_find_avx2(const unsigned char *p, Py_ssize_t n)
{
    return relax_find(p, n, 1);
}

AVX2_FN static unsigned char *
relax_from_avx2(const unsigned char *p, Py_ssize_t i, Py_ssize_t n, unsigned char *o,
                const unsigned char *o0)
{
    return relax_from(p, i, n, o, o0, 1);
}
#endif

/*
 * relax(data) -> data, or the canonical bytes
 *   data: whole lines, or any octets whose first one starts a line or follows an octet that
 *         is not WSP. Each WSP run becomes one SP and WSP before a CRLF goes (RFC 6376
 *         section 3.4.4 a and b); the object itself is returned when nothing changes.
 */
static PyObject *
relax(PyObject *self, PyObject *obj)
{
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *p = (const unsigned char *)view.buf;
    const Py_ssize_t n = view.len;
    Py_ssize_t i;

    /* Most blocks need nothing: find the first one that may. */
    Py_BEGIN_ALLOW_THREADS
#ifdef SCAN_AVX2
    i = use_avx2 ? relax_find_avx2(p, n) : relax_find_base(p, n);
#else
    i = relax_find_base(p, n);
#endif
    Py_END_ALLOW_THREADS
    if (i >= n) {
        PyBuffer_Release(&view);
        Py_INCREF(obj);
        return obj;
    }

    PyObject *out = PyBytes_FromStringAndSize(NULL, n); /* the result is never longer */
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    unsigned char *const o0 = (unsigned char *)PyBytes_AS_STRING(out);
    unsigned char *o;
    int same;
    Py_BEGIN_ALLOW_THREADS
    memcpy(o0, p, (size_t)i);
#ifdef SCAN_AVX2
    o = use_avx2 ? relax_from_avx2(p, i, n, o0 + i, o0) : relax_from_base(p, i, n, o0 + i, o0);
#else
    o = relax_from_base(p, i, n, o0 + i, o0);
#endif
    /* a candidate may have changed nothing (SP before a bare CR): then no copy either */
    same = o - o0 == n && memcmp(o0, p, (size_t)n) == 0;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (same) {
        Py_DECREF(out);
        Py_INCREF(obj);
        return obj;
    }
    if (o - o0 < n && _PyBytes_Resize(&out, o - o0) < 0)
        return NULL;
    return out;
}

static PyMethodDef methods[] = {
    {"edge", edge, METH_VARARGS,
     "edge(data, prev, line_len, limit) -> (flags, line_len): BARE_LF, LONG_LINE in a chunk."},
    {"relax", relax, METH_O,
     "relax(data) -> data or bytes: RFC 6376 3.4.4 a and b over octets that start a line."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "dkim_sidecar.dkim._scan", NULL, -1, methods,
};

PyMODINIT_FUNC
PyInit__scan(void)
{
    const char *simd = "swar";
#ifdef SCAN_SSE2
    simd = "sse2";
#endif
#ifdef SCAN_AVX2
    __builtin_cpu_init();
    use_avx2 = __builtin_cpu_supports("avx2");
    if (use_avx2)
        simd = "avx2";
#endif
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "BARE_LF", F_BARE_LF) < 0 ||
        PyModule_AddIntConstant(m, "LONG_LINE", F_LONG_LINE) < 0 ||
        PyModule_AddStringConstant(m, "SIMD", simd) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
