/* Native CPU kernel for bitsandbytes 4-bit dequantization.
 *
 * Why it exists: with torch ops, dequantizing takes four passes per chunk (widen the bytes, look the
 * code pairs up, scale, cast), and the lookup alone costs about as much as bitsandbytes' whole AVX-512
 * kernel. Here one pass does it all in registers: the 16 code values sit in one vector register and a
 * permute looks 16 codes up at once.
 *
 * Exactness: each value is the float32 product code[c] * absmax[block], rounded once to the output
 * type (round to nearest even), as bitsandbytes and the torch path compute it. No FMA, no
 * flush-to-zero: subnormal products are kept. bfloat16 rounding is done on the bits, as c10's
 * round_to_nearest_even does (NaN becomes 0x7FC0); float16 uses the hardware conversion, as torch does.
 *
 * The caller (bnb4bit_native.py) passes raw addresses of contiguous tensors and splits the work across
 * threads; the GIL is released while the loop runs. Only whole blocks, blocksize a multiple of 32.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define WSURGERY_X86 1
#endif

enum { OUT_FLOAT32 = 0, OUT_FLOAT16 = 1, OUT_BFLOAT16 = 2 };
enum { ISA_AVX2 = 1, ISA_AVX512 = 2 };
/* Indexed by the enum above: the names Python sees. */
static const char *const isa_names[] = {"", "avx2", "avx512"};

#ifdef WSURGERY_X86

__attribute__((target("avx512f,avx512bw")))
static __m256i bfloat16_avx512(__m512 x) {
    const __m512i bits = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    rounded = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), rounded, _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(rounded);
}

__attribute__((target("avx512f,avx512bw")))
static void dequantize_avx512(const uint8_t *packed, const float *absmax, const float *code, int64_t n,
                              int64_t blocksize, int out_type, void *out) {
    const __m512 table = _mm512_loadu_ps(code);
    /* Interleave: output 2k is the high nibble's value of byte k (first operand), 2k + 1 the low one's. */
    const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    const __m512i low_nibble = _mm512_set1_epi32(15);
    for (int64_t e = 0; e < n; e += 32) {
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(packed + e / 2)));
        const __m512 scale = _mm512_set1_ps(absmax[e / blocksize]);
        const __m512 high = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table), scale);
        const __m512 low = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(bytes, low_nibble), table), scale);
        const __m512 v0 = _mm512_permutex2var_ps(high, first, low), v1 = _mm512_permutex2var_ps(high, second, low);
        if (out_type == OUT_FLOAT32) {
            _mm512_storeu_ps((float *)out + e, v0);
            _mm512_storeu_ps((float *)out + e + 16, v1);
        } else if (out_type == OUT_FLOAT16) {
            _mm256_storeu_si256((__m256i *)((uint16_t *)out + e), _mm512_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT));
            _mm256_storeu_si256((__m256i *)((uint16_t *)out + e + 16), _mm512_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT));
        } else {
            _mm256_storeu_si256((__m256i *)((uint16_t *)out + e), bfloat16_avx512(v0));
            _mm256_storeu_si256((__m256i *)((uint16_t *)out + e + 16), bfloat16_avx512(v1));
        }
    }
}

__attribute__((target("avx2,f16c")))
static __m256 lookup_avx2(__m256i index, __m256 table_low, __m256 table_high) {
    /* permutevar8x32 reads the low 3 bits; bit 3, moved to the sign bit, picks the table half. */
    const __m256 pick_high = _mm256_castsi256_ps(_mm256_slli_epi32(index, 28));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(table_low, index), _mm256_permutevar8x32_ps(table_high, index),
                            pick_high);
}

__attribute__((target("avx2,f16c")))
static __m256i bfloat16_avx2(__m256 x) {
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
}

__attribute__((target("avx2,f16c")))
static void dequantize_avx2(const uint8_t *packed, const float *absmax, const float *code, int64_t n,
                            int64_t blocksize, int out_type, void *out) {
    const __m256 table_low = _mm256_loadu_ps(code), table_high = _mm256_loadu_ps(code + 8);
    const __m256i low_nibble = _mm256_set1_epi32(15);
    for (int64_t e = 0; e < n; e += 16) {
        const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(packed + e / 2)));
        const __m256 scale = _mm256_set1_ps(absmax[e / blocksize]);
        const __m256 high = _mm256_mul_ps(lookup_avx2(_mm256_srli_epi32(bytes, 4), table_low, table_high), scale);
        const __m256 low = _mm256_mul_ps(lookup_avx2(_mm256_and_si256(bytes, low_nibble), table_low, table_high), scale);
        /* unpack interleaves within 128-bit lanes; permute2f128 puts the lanes in order. */
        const __m256 lanes0 = _mm256_unpacklo_ps(high, low), lanes1 = _mm256_unpackhi_ps(high, low);
        const __m256 v0 = _mm256_permute2f128_ps(lanes0, lanes1, 0x20), v1 = _mm256_permute2f128_ps(lanes0, lanes1, 0x31);
        if (out_type == OUT_FLOAT32) {
            _mm256_storeu_ps((float *)out + e, v0);
            _mm256_storeu_ps((float *)out + e + 8, v1);
        } else if (out_type == OUT_FLOAT16) {
            _mm_storeu_si128((__m128i *)((uint16_t *)out + e), _mm256_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT));
            _mm_storeu_si128((__m128i *)((uint16_t *)out + e + 8), _mm256_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT));
        } else {
            /* packus works per lane: [v0 0-3, v1 0-3 | v0 4-7, v1 4-7]; 0xD8 orders the quarters 0, 2, 1, 3. */
            const __m256i halves = _mm256_packus_epi32(bfloat16_avx2(v0), bfloat16_avx2(v1));
            _mm256_storeu_si256((__m256i *)((uint16_t *)out + e), _mm256_permute4x64_epi64(halves, 0xD8));
        }
    }
}

static int isa_supported(int isa) {
    __builtin_cpu_init();
    if (isa == ISA_AVX512)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    if (isa == ISA_AVX2)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    return 0;
}

#else

static int isa_supported(int isa) {
    (void)isa;
    return 0;
}

#endif

static PyObject *supported_isas(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    PyObject *names = PyList_New(0);
    if (names == NULL)
        return NULL;
    for (int isa = ISA_AVX512; isa >= ISA_AVX2; isa--) {
        if (!isa_supported(isa))
            continue;
        PyObject *label = PyUnicode_FromString(isa_names[isa]);
        if (label == NULL || PyList_Append(names, label) < 0) {
            Py_XDECREF(label);
            Py_DECREF(names);
            return NULL;
        }
        Py_DECREF(label);
    }
    return names;
}

static int lookup(const char *name, const char *const *names, int count) {
    for (int i = 0; i < count; i++)
        if (strcmp(name, names[i]) == 0)
            return i;
    return -1;
}

static PyObject *dequantize(PyObject *self, PyObject *args) {
    (void)self;
    static const char *const out_types[] = {"float32", "float16", "bfloat16"};
    unsigned long long packed, absmax, code, out;
    long long n, blocksize;
    const char *out_name, *isa_name;
    if (!PyArg_ParseTuple(args, "KKKLLsKs", &packed, &absmax, &code, &n, &blocksize, &out_name, &out, &isa_name))
        return NULL;
    const int out_type = lookup(out_name, out_types, 3), isa = lookup(isa_name, isa_names, 3);
    if (n < 0 || blocksize < 32 || blocksize % 32 || n % blocksize) {
        PyErr_SetString(PyExc_ValueError, "dequantize: n must be whole blocks of a multiple of 32 elements");
        return NULL;
    }
    if (out_type < 0) {
        PyErr_Format(PyExc_ValueError, "dequantize: output type %s is not float32, float16 or bfloat16", out_name);
        return NULL;
    }
    if (isa <= 0 || !isa_supported(isa)) {
        PyErr_Format(PyExc_ValueError, "dequantize: instruction set '%s' is not supported on this CPU or build", isa_name);
        return NULL;
    }
#ifdef WSURGERY_X86
    Py_BEGIN_ALLOW_THREADS
    if (isa == ISA_AVX512)
        dequantize_avx512((const uint8_t *)packed, (const float *)absmax, (const float *)code, n, blocksize, out_type,
                          (void *)out);
    else
        dequantize_avx2((const uint8_t *)packed, (const float *)absmax, (const float *)code, n, blocksize, out_type,
                        (void *)out);
    Py_END_ALLOW_THREADS
#endif
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"supported_isas", supported_isas, METH_NOARGS, "Instruction sets this CPU and build can run, best first."},
    {"dequantize", dequantize, METH_VARARGS,
     "dequantize(packed, absmax, code, n, blocksize, out_dtype_name, out, isa): addresses of contiguous buffers."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_bnb4bit_native", .m_size = -1, .m_methods = methods,
};

PyMODINIT_FUNC PyInit__bnb4bit_native(void) {
    return PyModule_Create(&module);
}
