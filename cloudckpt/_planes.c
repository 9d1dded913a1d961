/* Float byte planes in one pass: the compiled part of cloudckpt.float_planes.
 *
 * The numpy version makes and joins the planes with strided byte stores and several
 * passes over each plane; these loops read and write each byte once, and gcc -O3
 * vectorises them. Optional: where this module was not built, cloudckpt uses numpy
 * (same bytes; tests compare the two). Every function releases the GIL.
 *
 * fp32, little-endian bytes b0 b1 b2 b3 of each element:
 *   exponent  = b3 << 1 | b2 >> 7            (8 bits; the sign dropped)
 *   sign_mant = (b3 & 0x80) | (b2 & 0x7F)     (the sign next to the top 7 mantissa bits)
 * and the planes b1, b0 as they are. bf16, bytes b0 b1: the same with b1, b0 in the
 * places of b3, b2.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef struct {
    Py_buffer view;
    int held;
} Buf;

static int get(PyObject *obj, Buf *b, int writable) {
    if (PyObject_GetBuffer(obj, &b->view, writable ? PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS
                                                   : PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    b->held = 1;
    return 0;
}

static void release(Buf *bufs, int n) {
    for (int i = 0; i < n; i++)
        if (bufs[i].held) PyBuffer_Release(&bufs[i].view);
}

/* Fills bufs from args (the last `writable` of them writable) and checks that buffer k
 * has sizes[k] bytes; sets an exception and releases what it took on failure. */
static int take(PyObject *args, Buf *bufs, int n, int writable, const Py_ssize_t *sizes) {
    if (!PyTuple_Check(args) || PyTuple_GET_SIZE(args) != n) {
        PyErr_Format(PyExc_TypeError, "expected %d buffers", n);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        bufs[i].held = 0;
    }
    for (int i = 0; i < n; i++) {
        if (get(PyTuple_GET_ITEM(args, i), &bufs[i], i >= n - writable) < 0) {
            release(bufs, n);
            return -1;
        }
        if (bufs[i].view.len != sizes[i]) {
            PyErr_Format(PyExc_ValueError, "buffer %d has %zd bytes, not %zd", i,
                         bufs[i].view.len, sizes[i]);
            release(bufs, n);
            return -1;
        }
    }
    return 0;
}

static Py_ssize_t length_of(PyObject *args, int index, int divisor) {
    Py_buffer v;
    if (!PyTuple_Check(args) || PyTuple_GET_SIZE(args) <= index) {
        PyErr_SetString(PyExc_TypeError, "missing buffer");
        return -1;
    }
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(args, index), &v, PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    Py_ssize_t len = v.len;
    PyBuffer_Release(&v);
    if (len % divisor) {
        PyErr_Format(PyExc_ValueError, "%zd bytes is not a multiple of %d", len, divisor);
        return -1;
    }
    return len / divisor;
}

/* split_fp32(elems, exponent, sign_mant, b1, b0): elems 4n bytes; the rest n each. */
static PyObject *split_fp32(PyObject *self, PyObject *args) {
    Py_ssize_t n = length_of(args, 0, 4);
    if (n < 0) return NULL;
    Buf b[5];
    const Py_ssize_t sizes[5] = {4 * n, n, n, n, n};
    if (take(args, b, 5, 4, sizes) < 0) return NULL;
    const uint8_t *src = b[0].view.buf;
    uint8_t *e = b[1].view.buf, *s = b[2].view.buf, *m1 = b[3].view.buf, *m0 = b[4].view.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        uint8_t top = src[4 * i + 3], nxt = src[4 * i + 2];
        e[i] = (uint8_t)((top << 1) | (nxt >> 7));
        s[i] = (uint8_t)((top & 0x80) | (nxt & 0x7F));
        m1[i] = src[4 * i + 1];
        m0[i] = src[4 * i];
    }
    Py_END_ALLOW_THREADS
    release(b, 5);
    Py_RETURN_NONE;
}

/* join_fp32(exponent, sign_mant, b1, b0, out): out 4n bytes. */
static PyObject *join_fp32(PyObject *self, PyObject *args) {
    Py_ssize_t n = length_of(args, 0, 1);
    if (n < 0) return NULL;
    Buf b[5];
    const Py_ssize_t sizes[5] = {n, n, n, n, 4 * n};
    if (take(args, b, 5, 1, sizes) < 0) return NULL;
    const uint8_t *e = b[0].view.buf, *s = b[1].view.buf, *m1 = b[2].view.buf,
                  *m0 = b[3].view.buf;
    uint8_t *out = b[4].view.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        out[4 * i + 3] = (uint8_t)((s[i] & 0x80) | (e[i] >> 1));
        out[4 * i + 2] = (uint8_t)(((e[i] & 1) << 7) | (s[i] & 0x7F));
        out[4 * i + 1] = m1[i];
        out[4 * i] = m0[i];
    }
    Py_END_ALLOW_THREADS
    release(b, 5);
    Py_RETURN_NONE;
}

/* split_bf16(elems, exponent, sign_mant): elems 2n bytes. */
static PyObject *split_bf16(PyObject *self, PyObject *args) {
    Py_ssize_t n = length_of(args, 0, 2);
    if (n < 0) return NULL;
    Buf b[3];
    const Py_ssize_t sizes[3] = {2 * n, n, n};
    if (take(args, b, 3, 2, sizes) < 0) return NULL;
    const uint8_t *src = b[0].view.buf;
    uint8_t *e = b[1].view.buf, *s = b[2].view.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        uint8_t top = src[2 * i + 1], nxt = src[2 * i];
        e[i] = (uint8_t)((top << 1) | (nxt >> 7));
        s[i] = (uint8_t)((top & 0x80) | (nxt & 0x7F));
    }
    Py_END_ALLOW_THREADS
    release(b, 3);
    Py_RETURN_NONE;
}

/* join_bf16(exponent, sign_mant, out): out 2n bytes. */
static PyObject *join_bf16(PyObject *self, PyObject *args) {
    Py_ssize_t n = length_of(args, 0, 1);
    if (n < 0) return NULL;
    Buf b[3];
    const Py_ssize_t sizes[3] = {n, n, 2 * n};
    if (take(args, b, 3, 1, sizes) < 0) return NULL;
    const uint8_t *e = b[0].view.buf, *s = b[1].view.buf;
    uint8_t *out = b[2].view.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        out[2 * i + 1] = (uint8_t)((s[i] & 0x80) | (e[i] >> 1));
        out[2 * i] = (uint8_t)(((e[i] & 1) << 7) | (s[i] & 0x7F));
    }
    Py_END_ALLOW_THREADS
    release(b, 3);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"split_fp32", split_fp32, METH_VARARGS,
     "split_fp32(elems, exponent, sign_mant, b1, b0): fp32 elements into their planes."},
    {"join_fp32", join_fp32, METH_VARARGS,
     "join_fp32(exponent, sign_mant, b1, b0, out): the planes back into fp32 elements."},
    {"split_bf16", split_bf16, METH_VARARGS,
     "split_bf16(elems, exponent, sign_mant): bf16 elements into their two planes."},
    {"join_bf16", join_bf16, METH_VARARGS,
     "join_bf16(exponent, sign_mant, out): the two planes back into bf16 elements."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "cloudckpt._planes",
    "Float byte planes in one pass (optional; cloudckpt.float_planes falls back to numpy).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__planes(void) { return PyModule_Create(&module); }
