/*
 * dkim_sidecar._scan: one pass over a body chunk, in C.
 *
 * The body path needs to know, per chunk, whether there is anything to do at all: a bare LF
 * to turn into CRLF, a tab, a run of spaces or a space before CRLF for relaxed body
 * canonicalization (RFC 6376 section 3.4.4), a line over 998 octets (RFC 5322 section
 * 2.1.1). In Python each of these is its own scan at 1-2 ns per octet (bytes.count and
 * multi-octet `in` are slow in CPython 3.11): five of them cost more than SHA-256 itself.
 * This does all of them in one pass. It only answers questions; all changes to the
 * message stay in Python, and canon.py / session.py keep a pure-Python path that gives the
 * same answers (the tests compare both).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define F_BARE_LF 1      /* an LF not preceded by CR */
#define F_TAB 2          /* an HTAB anywhere */
#define F_SPACE_RUN 4    /* two SP in a row */
#define F_SPACE_CRLF 8   /* SP CR LF */
#define F_LONG_LINE 16   /* a line longer than `limit` octets before its CRLF */

/* 0x80 in each octet of x that equals c, 0 elsewhere (exact: no false positives). */
static inline uint64_t
eq_mask(uint64_t x, unsigned char c)
{
    const uint64_t low7 = 0x7F7F7F7F7F7F7F7FULL;
    const uint64_t t = x ^ (0x0101010101010101ULL * c);
    return ~(((t & low7) + low7) | t | low7);
}

/* The LF at index `at`: what ends there, and how long that line was. */
static inline void
line_end(const unsigned char *p, Py_ssize_t at, unsigned char before, Py_ssize_t *start,
         Py_ssize_t max_before_lf, int *flags)
{
    const unsigned char c1 = at >= 1 ? p[at - 1] : before;
    const unsigned char c2 = at >= 2 ? p[at - 2] : (at == 1 ? before : 0);
    if (c1 != '\r')
        *flags |= F_BARE_LF;
    else if (c2 == ' ')
        *flags |= F_SPACE_CRLF;
    if (at - *start > max_before_lf)
        *flags |= F_LONG_LINE;
    *start = at + 1;
}

/*
 * scan(data, prev, line_len, limit) -> (flags, line_len)
 *   prev: the octet before data (0 at the start), so a CR ending one chunk pairs with the LF
 *         starting the next, and an SP with the SP after it;
 *   line_len: octets of the current line seen before data;
 *   limit: the longest line allowed, CRLF excluded (998).
 * Returns the flags found and the length of the line still open at the end of data.
 */
static PyObject *
scan(PyObject *self, PyObject *args)
{
    Py_buffer view;
    int prev;
    Py_ssize_t line_len, limit;
    if (!PyArg_ParseTuple(args, "y*inn", &view, &prev, &line_len, &limit))
        return NULL;
    const unsigned char *p = (const unsigned char *)view.buf;
    const Py_ssize_t n = view.len;
    const unsigned char b1 = (unsigned char)prev; /* the octet before data */
    int flags = 0;
    /* a line's octets before its LF, CR included: the limit plus one for that CR */
    const Py_ssize_t max_before_lf = limit + 1;
    Py_ssize_t start = -line_len; /* index where the current line started */

    Py_BEGIN_ALLOW_THREADS
    /* Eight octets at a time (SWAR): a mask with 0x80 in each octet equal to SP, HTAB or LF;
       most words of a body have no HTAB, no two SP in a row and no LF, and cost a few
       instructions. Each LF found is looked at on its own. */
    Py_ssize_t i = 0;
    int prev_sp = (b1 == ' '); /* did the octet before this word hold SP? */
    for (; i + 8 <= n; i += 8) {
        uint64_t x;
        memcpy(&x, p + i, 8); /* little-endian: octet k is bits 8k..8k+7 */
        const uint64_t sp = eq_mask(x, ' ');
        const uint64_t lf = eq_mask(x, '\n');
        if (eq_mask(x, '\t'))
            flags |= F_TAB;
        if ((sp & (sp >> 8)) || (prev_sp && (sp & 0x80)))
            flags |= F_SPACE_RUN;
        prev_sp = (sp >> 63) != 0;
        for (uint64_t m = lf; m; m &= m - 1)
            line_end(p, i + (__builtin_ctzll(m) >> 3), b1, &start, max_before_lf, &flags);
    }
    for (; i < n; i++) {
        const unsigned char c = p[i];
        if (c == '\t')
            flags |= F_TAB;
        else if (c == ' ') {
            if (prev_sp)
                flags |= F_SPACE_RUN;
        } else if (c == '\n')
            line_end(p, i, b1, &start, max_before_lf, &flags);
        prev_sp = (c == ' ');
    }
    Py_END_ALLOW_THREADS

    Py_ssize_t open_len = n - start;
    if (open_len > max_before_lf)
        flags |= F_LONG_LINE;
    PyBuffer_Release(&view);
    return Py_BuildValue("in", flags, open_len);
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS,
     "scan(data, prev, line_len, limit) -> (flags, line_len): one pass over a body chunk."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "dkim_sidecar._scan", NULL, -1, methods,
};

PyMODINIT_FUNC
PyInit__scan(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "BARE_LF", F_BARE_LF) < 0 ||
        PyModule_AddIntConstant(m, "TAB", F_TAB) < 0 ||
        PyModule_AddIntConstant(m, "SPACE_RUN", F_SPACE_RUN) < 0 ||
        PyModule_AddIntConstant(m, "SPACE_CRLF", F_SPACE_CRLF) < 0 ||
        PyModule_AddIntConstant(m, "LONG_LINE", F_LONG_LINE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
