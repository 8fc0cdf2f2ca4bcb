// edgead: IEEE 754 binary16 bit pattern -> float, portable (no F16C / __fp16 needed).
#ifndef EDGEAD_HALF_BITS_H
#define EDGEAD_HALF_BITS_H
#include <cmath>
#include <cstdint>
#include <cstring>

namespace edgead {

// Normals, subnormals, +-0, inf and nan.
inline float half_bits_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu;
    const uint32_t mantissa = h & 0x3ffu;
    uint32_t bits;
    if (exponent == 0) {
        if (mantissa == 0) {
            bits = sign;
        } else {  // subnormal: value = mantissa * 2^-24
            const float v = std::ldexp((float)mantissa, -24);
            return sign ? -v : v;
        }
    } else if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    }
    float out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
}

}  // namespace edgead

#endif
