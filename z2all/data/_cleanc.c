/* z2all/data/_cleanc.c: the compiled prose cleaner, `z2all.data._cleanc`.
 *
 * It owns one function, clean_prose(s, max_punct_run) -> str | None: steps 1-6 of clean.py's prose rules
 * (newline and space mapping, dropping control/surrogate/private-use characters, inner-space collapse,
 * trailing spaces, no space between CJK characters, at most one blank line, punctuation runs cut, and the
 * final strip) in one left-to-right scan of the string, with no intermediate strings. The Python code of
 * clean.py (`Cleaner.clean_prose_py`) is the reference: this module must give byte-identical output, and
 * tests/data/test_clean_c.py compares the two on real corpora and on generated strings.
 *
 * None means "not decided here, use the Python code": returned for a document holding a character that is
 * neither printable nor of a class whose treatment is fixed (a format character such as U+200B or U+FEFF,
 * or one unassigned in this Python's Unicode tables). The Python code drops such characters with the
 * `regex` module's \p{C}, whose Unicode version can be newer than Python's own, so only it knows the answer.
 * Also returned for a str subclass or any non-str argument.
 *
 * The character classes (which characters map to " " or "\n", which are CJK, which are punctuation, which
 * format characters are kept) come from clean.py through init(), so clean.py stays the one place that
 * names them; printability comes from CPython's own table (Py_UNICODE_ISPRINTABLE, as str.isprintable).
 * Controls (Cc), surrogates (Cs) and private use (Co) are fixed ranges in every Unicode version, written
 * here.
 *
 * Single pass, per character: one lookup in a 64 KB class table (code points above U+FFFF are classified
 * on the fly), then the character is copied, mapped or skipped. A run of spaces is decided when its end is
 * seen: dropped before a newline or at the end (trailing spaces, and the final strip), kept whole after a
 * newline or at the start (indentation), dropped between two CJK characters, else one space. Newline runs
 * are cut to two and same-character punctuation runs to max_punct_run as they are written, so a run that
 * only forms once a space between CJK characters is gone ("。 。") is cut like the regex passes cut it.
 * An unchanged document returns the argument itself.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* the class table: kind in the low bits, flags above */
enum { K_NORMAL = 0, K_SPACE = 1, K_NEWLINE = 2, K_CR = 3, K_DROP = 4, K_FALLBACK = 5 };
#define K_MASK 0x0f
#define F_CJK 0x10
#define F_PUNCT 0x20

/* what the last non-space character seen was, for the indentation and CJK-space rules */
enum { P_LINE_START = 0, P_CJK = 1, P_OTHER = 2 };

#define MAX_ASTRAL 64

static unsigned char bmp_class[0x10000];
static int tables_ready = 0;

/* classes of code points above U+FFFF named by init() (kept in small arrays: there are few) */
static Py_UCS4 astral_cjk_lo[MAX_ASTRAL], astral_cjk_hi[MAX_ASTRAL];
static int n_astral_cjk = 0;
static Py_UCS4 astral_char[MAX_ASTRAL];
static unsigned char astral_char_class[MAX_ASTRAL];
static int n_astral_char = 0;

static int
fixed_drop(Py_UCS4 c)
{
    return c < 0x20 || (c >= 0x7f && c <= 0x9f)        /* Cc */
           || (c >= 0xd800 && c <= 0xdfff)              /* Cs */
           || (c >= 0xe000 && c <= 0xf8ff)              /* Co, BMP */
           || (c >= 0xf0000 && c <= 0xffffd)            /* Co, plane 15 */
           || (c >= 0x100000 && c <= 0x10fffd);         /* Co, plane 16 */
}

static unsigned
base_class(Py_UCS4 c)
{
    if (Py_UNICODE_ISPRINTABLE(c))
        return K_NORMAL;
    return fixed_drop(c) ? K_DROP : K_FALLBACK;
}

static unsigned
astral_class(Py_UCS4 c)
{
    unsigned k;
    int i;
    for (i = 0; i < n_astral_char; i++)
        if (astral_char[i] == c)
            return astral_char_class[i];
    k = base_class(c);
    if (k == K_NORMAL)
        for (i = 0; i < n_astral_cjk; i++)
            if (c >= astral_cjk_lo[i] && c <= astral_cjk_hi[i])
                return K_NORMAL | F_CJK;
    return k;
}

#define CLASS_BMP(c) ((unsigned)bmp_class[(c)])
#define CLASS_WIDE(c) ((c) < 0x10000 ? (unsigned)bmp_class[(c)] : astral_class(c))

/* One scan of in[0:n] into out (room for n). Returns the output length, or -1 for "use the Python code".
 * *acc gets the OR of the written characters (its highest bit bounds the widest one), *mapped whether a
 * character was replaced by another (a replacement keeps the length, so the length alone cannot tell). */
#define DEFINE_SCAN(NAME, T, CLASSOF)                                                                     \
    static Py_ssize_t NAME(const T *in, Py_ssize_t n, T *out, int maxrun, Py_UCS4 *acc_out, int *mapped_out) \
    {                                                                                                     \
        Py_ssize_t i = 0, o = 0;                                                                          \
        Py_UCS4 acc = 0, last_out = 0;                                                                    \
        int prev = P_LINE_START, nl = 0, prun = 0, mapped = 0;                                            \
        while (i < n) {                                                                                   \
            Py_UCS4 c = in[i];                                                                            \
            unsigned k = CLASSOF(c);                                                                      \
            if ((k & ~F_CJK) == 0) { /* the common case: a run of printable non-punctuation characters */ \
                unsigned lastk;                                                                           \
                do {                                                                                      \
                    out[o++] = (T)c;                                                                      \
                    acc |= c;                                                                             \
                    lastk = k;                                                                            \
                    if (++i == n)                                                                         \
                        break;                                                                            \
                    c = in[i];                                                                            \
                    k = CLASSOF(c);                                                                       \
                } while ((k & ~F_CJK) == 0);                                                              \
                prev = (lastk & F_CJK) ? P_CJK : P_OTHER;                                                 \
                last_out = in[i - 1];                                                                     \
                nl = 0;                                                                                   \
                continue;                                                                                 \
            }                                                                                             \
            if (c == ' ' && i + 1 < n && (CLASSOF(in[i + 1]) & K_MASK) == K_NORMAL) {                     \
                /* one space before a printable character (a word gap): see K_SPACE below */              \
                i++;                                                                                      \
                if (prev != P_CJK || !(CLASSOF(in[i]) & F_CJK)) {                                         \
                    out[o++] = ' ';                                                                       \
                    last_out = ' ';                                                                       \
                    nl = 0;                                                                               \
                }                                                                                         \
                continue;                                                                                 \
            }                                                                                             \
            switch (k & K_MASK) {                                                                         \
            case K_NORMAL: /* punctuation */                                                              \
                i++;                                                                                      \
                prev = (k & F_CJK) ? P_CJK : P_OTHER;                                                     \
                nl = 0;                                                                                   \
                if (maxrun > 0) {                                                                         \
                    if (c == last_out) {                                                                  \
                        if (++prun > maxrun)                                                              \
                            continue; /* past max_punct_run: cut */                                      \
                    }                                                                                     \
                    else                                                                                  \
                        prun = 1;                                                                         \
                }                                                                                         \
                out[o++] = (T)c;                                                                          \
                acc |= c;                                                                                 \
                last_out = c;                                                                             \
                break;                                                                                    \
            case K_CR:                                                                                    \
                if (i + 1 < n && in[i + 1] == '\n') { /* CRLF: the LF stays */                            \
                    i++;                                                                                  \
                    break;                                                                                \
                }                                                                                         \
                /* fall through: a lone CR is a newline */                                                \
            case K_NEWLINE:                                                                               \
                if (c != '\n')                                                                            \
                    mapped = 1;                                                                           \
                i++;                                                                                      \
                prev = P_LINE_START;                                                                      \
                if (++nl <= 2) { /* 3+ newlines -> 2 */                                                   \
                    out[o++] = '\n';                                                                      \
                    last_out = '\n';                                                                      \
                }                                                                                         \
                break;                                                                                    \
            case K_DROP:                                                                                  \
                i++;                                                                                      \
                break;                                                                                    \
            case K_SPACE: {                                                                               \
                Py_ssize_t j = i, run = 0;                                                                \
                unsigned kn = 0;                                                                          \
                for (; j < n; j++) { /* the run, across dropped characters */                             \
                    Py_UCS4 cj = in[j];                                                                   \
                    unsigned kk;                                                                          \
                    kn = CLASSOF(cj);                                                                     \
                    kk = kn & K_MASK;                                                                     \
                    if (kk == K_SPACE) {                                                                  \
                        run++;                                                                            \
                        if (cj != ' ')                                                                    \
                            mapped = 1;                                                                   \
                    }                                                                                     \
                    else if (kk == K_FALLBACK)                                                            \
                        return -1;                                                                        \
                    else if (kk != K_DROP)                                                                \
                        break;                                                                            \
                }                                                                                         \
                i = j;                                                                                    \
                if (j == n || (kn & K_MASK) == K_NEWLINE || (kn & K_MASK) == K_CR)                        \
                    break; /* trailing spaces */                                                          \
                if (prev == P_LINE_START) { /* indentation stays as it is */                              \
                    Py_ssize_t r;                                                                         \
                    for (r = 0; r < run; r++)                                                             \
                        out[o++] = ' ';                                                                   \
                }                                                                                         \
                else if (prev == P_CJK && (kn & F_CJK))                                                   \
                    break; /* between two CJK characters */                                               \
                else                                                                                      \
                    out[o++] = ' ';                                                                       \
                last_out = ' ';                                                                           \
                nl = 0;                                                                                   \
                break;                                                                                    \
            }                                                                                             \
            default: /* K_FALLBACK */                                                                     \
                return -1;                                                                                \
            }                                                                                             \
        }                                                                                                 \
        *acc_out = acc;                                                                                   \
        *mapped_out = mapped;                                                                             \
        return o;                                                                                         \
    }

DEFINE_SCAN(scan_ucs1, Py_UCS1, CLASS_BMP)
DEFINE_SCAN(scan_ucs2, Py_UCS2, CLASS_BMP)
DEFINE_SCAN(scan_ucs4, Py_UCS4, CLASS_WIDE)

static PyObject *
clean_prose(PyObject *self, PyObject *args)
{
    PyObject *s, *res;
    int maxrun, kind, mapped = 0;
    Py_ssize_t n, o, start, end, k;
    Py_UCS4 acc = 0, maxchar;
    void *buf;
    const void *data;

    if (!PyArg_ParseTuple(args, "Oi:clean_prose", &s, &maxrun))
        return NULL;
    if (!tables_ready) {
        PyErr_SetString(PyExc_RuntimeError, "_cleanc.init() was not called");
        return NULL;
    }
    if (!PyUnicode_CheckExact(s))
        Py_RETURN_NONE;
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(s) < 0)
        return NULL;
#endif
    n = PyUnicode_GET_LENGTH(s);
    if (n == 0) {
        Py_INCREF(s);
        return s;
    }
    kind = PyUnicode_KIND(s);
    data = PyUnicode_DATA(s);
    buf = PyMem_Malloc((size_t)n * (size_t)kind);
    if (buf == NULL)
        return PyErr_NoMemory();
    if (kind == PyUnicode_1BYTE_KIND)
        o = scan_ucs1((const Py_UCS1 *)data, n, (Py_UCS1 *)buf, maxrun, &acc, &mapped);
    else if (kind == PyUnicode_2BYTE_KIND)
        o = scan_ucs2((const Py_UCS2 *)data, n, (Py_UCS2 *)buf, maxrun, &acc, &mapped);
    else
        o = scan_ucs4((const Py_UCS4 *)data, n, (Py_UCS4 *)buf, maxrun, &acc, &mapped);
    if (o < 0) {
        PyMem_Free(buf);
        Py_RETURN_NONE;
    }
    /* str.strip(): only " " and "\n" can be whitespace here (everything else was mapped or dropped) */
    start = 0;
    end = o;
    while (start < end && (PyUnicode_READ(kind, buf, start) == ' ' || PyUnicode_READ(kind, buf, start) == '\n'))
        start++;
    while (end > start && (PyUnicode_READ(kind, buf, end - 1) == ' ' || PyUnicode_READ(kind, buf, end - 1) == '\n'))
        end--;
    if (start == 0 && end == n && !mapped) { /* nothing deleted, nothing replaced */
        PyMem_Free(buf);
        Py_INCREF(s);
        return s;
    }
    /* acc ORs code points: it is below 0x80 / 0x100 / 0x10000 exactly when every written one is */
    maxchar = acc > 0xffff ? 0x10ffff : acc;
    res = PyUnicode_New(end - start, maxchar);
    if (res == NULL) {
        PyMem_Free(buf);
        return NULL;
    }
    if (PyUnicode_KIND(res) == kind)
        memcpy(PyUnicode_DATA(res), (char *)buf + start * kind, (size_t)(end - start) * (size_t)kind);
    else { /* narrower than the input: a dropped or mapped character was the widest */
        int rkind = PyUnicode_KIND(res);
        void *rdata = PyUnicode_DATA(res);
        for (k = start; k < end; k++)
            PyUnicode_WRITE(rkind, rdata, k - start, PyUnicode_READ(kind, buf, k));
    }
    PyMem_Free(buf);
    return res;
}

/* init(space_like, newline_like, keep, punct, cjk_ranges): the character classes of clean.py.
 * space_like map to " " and newline_like to "\n" (besides " " and "\n" themselves); keep are format
 * characters that stay (ZWNJ, ZWJ); punct the characters whose runs are cut; cjk_ranges (lo, hi) pairs. */
static int
set_class(Py_UCS4 c, unsigned k)
{
    int i;
    if (c < 0x10000) {
        bmp_class[c] = (unsigned char)((bmp_class[c] & ~K_MASK) | k);
        return 0;
    }
    for (i = 0; i < n_astral_char; i++)
        if (astral_char[i] == c) {
            astral_char_class[i] = (unsigned char)((astral_char_class[i] & ~K_MASK) | k);
            return 0;
        }
    if (n_astral_char == MAX_ASTRAL) {
        PyErr_SetString(PyExc_ValueError, "too many special characters above U+FFFF");
        return -1;
    }
    astral_char[n_astral_char] = c;
    astral_char_class[n_astral_char++] = (unsigned char)k;
    return 0;
}

static int
set_chars(PyObject *chars, unsigned k)
{
    Py_ssize_t i;
    if (!PyUnicode_Check(chars)) {
        PyErr_SetString(PyExc_TypeError, "character classes must be str");
        return -1;
    }
    for (i = 0; i < PyUnicode_GET_LENGTH(chars); i++)
        if (set_class(PyUnicode_READ_CHAR(chars, i), k) < 0)
            return -1;
    return 0;
}

static PyObject *
init(PyObject *self, PyObject *args)
{
    PyObject *space_like, *newline_like, *keep, *punct, *cjk, *seq;
    Py_ssize_t i, m;
    Py_UCS4 c;

    if (!PyArg_ParseTuple(args, "UUUUO:init", &space_like, &newline_like, &keep, &punct, &cjk))
        return NULL;
    tables_ready = 0;
    n_astral_cjk = n_astral_char = 0;
    for (c = 0; c < 0x10000; c++)
        bmp_class[c] = (unsigned char)base_class(c);
    if (set_chars(keep, K_NORMAL) < 0 || set_chars(space_like, K_SPACE) < 0 ||
        set_chars(newline_like, K_NEWLINE) < 0 || set_class(' ', K_SPACE) < 0 || set_class('\n', K_NEWLINE) < 0 ||
        set_class('\r', K_CR) < 0)
        return NULL;
    /* astral specials found before the flags are added: their entries carry the flags too */
    seq = PySequence_Fast(cjk, "cjk_ranges must be a sequence of (lo, hi)");
    if (seq == NULL)
        return NULL;
    m = PySequence_Fast_GET_SIZE(seq);
    for (i = 0; i < m; i++) {
        unsigned long lo, hi, x;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "kk", &lo, &hi)) {
            Py_DECREF(seq);
            return NULL;
        }
        if (lo > hi || hi > 0x10ffff) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "bad CJK range");
            return NULL;
        }
        for (x = lo; x <= hi && x < 0x10000; x++)
            bmp_class[x] |= F_CJK;
        if (hi >= 0x10000) {
            if (n_astral_cjk == MAX_ASTRAL) {
                Py_DECREF(seq);
                PyErr_SetString(PyExc_ValueError, "too many CJK ranges above U+FFFF");
                return NULL;
            }
            astral_cjk_lo[n_astral_cjk] = lo < 0x10000 ? 0x10000 : (Py_UCS4)lo;
            astral_cjk_hi[n_astral_cjk++] = (Py_UCS4)hi;
        }
    }
    Py_DECREF(seq);
    for (i = 0; i < PyUnicode_GET_LENGTH(punct); i++) {
        c = PyUnicode_READ_CHAR(punct, i);
        if (c < 0x10000) {
            bmp_class[c] |= F_PUNCT;
            continue;
        }
        /* an astral punctuation character: an explicit entry with its base class and CJK flag */
        {
            unsigned k = astral_class(c);
            int j;
            if (set_class(c, k & K_MASK) < 0)
                return NULL;
            for (j = 0; j < n_astral_char; j++)
                if (astral_char[j] == c)
                    astral_char_class[j] = (unsigned char)(k | F_PUNCT);
        }
    }
    /* explicit astral entries (space, newline, keep) get their CJK flag: astral_class returns them as is */
    for (i = 0; i < n_astral_char; i++) {
        int j;
        for (j = 0; j < n_astral_cjk; j++)
            if (astral_char[i] >= astral_cjk_lo[j] && astral_char[i] <= astral_cjk_hi[j] &&
                (astral_char_class[i] & K_MASK) == K_NORMAL)
                astral_char_class[i] |= F_CJK;
    }
    tables_ready = 1;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"clean_prose", clean_prose, METH_VARARGS,
     "clean_prose(s, max_punct_run) -> str | None: clean.py's prose rules 1-6 and the final strip in one "
     "scan; None: the document needs the Python code (a format or unassigned character, or not a str)."},
    {"init", init, METH_VARARGS,
     "init(space_like, newline_like, keep, punct, cjk_ranges): the character classes, from clean.py."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_cleanc", "clean.py's prose cleaning in one compiled scan (clean.py is the reference).",
    -1, methods,
};

PyMODINIT_FUNC
PyInit__cleanc(void)
{
    return PyModule_Create(&moduledef);
}
