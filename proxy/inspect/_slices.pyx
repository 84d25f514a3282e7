# cython: language_level=3, boundscheck=False, wraparound=False
"""The compiled twins of proxy/inspect/slices.py's reference passes: the same results, one C loop
each (see there).  Keep them in step: tests/test_inspect_slices.py runs both on random slices."""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.float cimport PyFloat_AsDouble
from cpython.list cimport PyList_Append
from cpython.long cimport PyLong_FromVoidPtr
from cpython.ref cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdint cimport uintptr_t
from libc.stdlib cimport calloc, free

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object text, Py_ssize_t* size) except NULL

# the fields of proxy.protocol.records.StatementEvent these passes read
cdef enum:
    F_CLIENT = 0
    F_QUERY = 1
    F_INDEX = 2
    F_START = 7
    F_END = 8
    F_ROWS = 11
    F_SQLSTATE = 12
    F_IN_TX = 13
    N_FIELDS = 14


def columns(evs):
    """See slices.py_columns."""
    cdef list seq = evs if type(evs) is list else list(evs)
    cdef Py_ssize_t n = len(seq), i
    cdef list clients = [None] * n, queries = [None] * n, indexes = [None] * n
    cdef list starts = [None] * n, ends = [None] * n, rows = [None] * n
    cdef list sqlstates = [None] * n, in_tx = [None] * n, durations = [None] * n
    cdef double d
    for i in range(n):
        ev = seq[i]
        if not isinstance(ev, tuple) or PyTuple_GET_SIZE(ev) != N_FIELDS:
            raise ValueError("not a statement record")
        d = PyFloat_AsDouble(<object>PyTuple_GET_ITEM(ev, F_END)) - PyFloat_AsDouble(
            <object>PyTuple_GET_ITEM(ev, F_START))
        clients[i] = <object>PyTuple_GET_ITEM(ev, F_CLIENT)
        queries[i] = <object>PyTuple_GET_ITEM(ev, F_QUERY)
        indexes[i] = <object>PyTuple_GET_ITEM(ev, F_INDEX)
        starts[i] = <object>PyTuple_GET_ITEM(ev, F_START)
        ends[i] = <object>PyTuple_GET_ITEM(ev, F_END)
        rows[i] = <object>PyTuple_GET_ITEM(ev, F_ROWS)
        sqlstates[i] = <object>PyTuple_GET_ITEM(ev, F_SQLSTATE)
        in_tx[i] = <object>PyTuple_GET_ITEM(ev, F_IN_TX)
        durations[i] = d
    return clients, queries, indexes, starts, ends, rows, sqlstates, in_tx, durations


cdef bytes _zeroed(object text):
    """``text`` as UTF-8 with every ASCII digit turned into '0'."""
    cdef Py_ssize_t size, k
    cdef const char* src = PyUnicode_AsUTF8AndSize(text, &size)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* dst = PyBytes_AS_STRING(out)
    cdef char c
    for k in range(size):
        c = src[k]
        dst[k] = b'0' if b'1' <= c <= b'9' else c
    return out


def lookup_texts(dict cache, queries):
    """See slices.py_lookup_texts."""
    cdef list qs = queries if type(queries) is list else list(queries)
    cdef Py_ssize_t n = len(qs), i, missing = 0, left = 0
    cdef list infos = [None] * n
    for i in range(n):
        info = cache.get(qs[i])
        if info is None:
            missing += 1
        else:
            infos[i] = info
    if not missing:
        return infos, 0, 0
    zeroed = [_zeroed(q) for q in qs]  # every text, as the reference encodes them all
    for i in range(n):
        if infos[i] is None:
            info = cache.get(zeroed[i])
            if info is None:
                left += 1
            else:
                infos[i] = info
    return infos, missing - left, left


def group(infos, clients):
    """See slices.py_group: an open-addressing table on the two objects' addresses, a dict entry
    per group."""
    cdef list a = infos if type(infos) is list else list(infos)
    cdef list b = clients if type(clients) is list else list(clients)
    cdef Py_ssize_t n = min(len(a), len(b)), i, cap = 16, slot
    cdef uintptr_t x, y
    cdef dict groups = {}
    while cap < 2 * n:
        cap <<= 1
    cdef uintptr_t* keys = <uintptr_t*>calloc(cap * 2, sizeof(uintptr_t))
    cdef PyObject** lists = <PyObject**>calloc(cap, sizeof(PyObject*))  # borrowed: groups holds them
    if keys == NULL or lists == NULL:
        free(keys)
        free(lists)
        raise MemoryError()
    try:
        for i in range(n):
            x = <uintptr_t><PyObject*>a[i]
            y = <uintptr_t><PyObject*>b[i]
            slot = <Py_ssize_t>(((x >> 4) * <uintptr_t>0x9E3779B97F4A7C15u) ^ ((y >> 4) * <uintptr_t>0xC2B2AE3D27D4EB4Fu)
                                ) & (cap - 1)
            while lists[slot] != NULL and (keys[2 * slot] != x or keys[2 * slot + 1] != y):
                slot = (slot + 1) & (cap - 1)
            if lists[slot] == NULL:
                lst = [i]
                groups[(PyLong_FromVoidPtr(<void*>x), PyLong_FromVoidPtr(<void*>y))] = lst
                keys[2 * slot] = x
                keys[2 * slot + 1] = y
                lists[slot] = <PyObject*>lst
            else:
                PyList_Append(<object>lists[slot], i)
    finally:
        free(keys)
        free(lists)
    return groups


def run_summary(evs, idx, double last_end):
    """See slices.py_run_summary."""
    cdef list seq = evs if type(evs) is list else list(evs)
    cdef list ix = idx if type(idx) is list else list(idx)
    cdef Py_ssize_t k, n = len(ix), rows, max_rows = 0
    cdef double start, end, prev = last_end, gap, max_gap = 0.0, spent = 0.0
    cdef bint ok = True
    if n == 0:
        raise ValueError("an empty group")
    for k in range(n):
        ev = seq[<Py_ssize_t>ix[k]]
        if not isinstance(ev, tuple) or PyTuple_GET_SIZE(ev) != N_FIELDS:
            raise ValueError("not a statement record")
        start = PyFloat_AsDouble(<object>PyTuple_GET_ITEM(ev, F_START))
        end = PyFloat_AsDouble(<object>PyTuple_GET_ITEM(ev, F_END))
        rows = <object>PyTuple_GET_ITEM(ev, F_ROWS)
        gap = start - prev
        if k == 0 or gap > max_gap:
            max_gap = gap
        if k == 0 or rows > max_rows:
            max_rows = rows
        if <object>PyTuple_GET_ITEM(ev, F_SQLSTATE) is not None:
            ok = False
        spent += end - start
        prev = end
    return max_gap, ok, spent, max_rows, prev
