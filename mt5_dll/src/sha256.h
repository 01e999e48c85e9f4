/* sha256.h: SHA-256 (FIPS 180-4) of a byte range, for certificate pinning. Our own few lines
 * rather than BCrypt, so that the DLL still imports only KERNEL32, msvcrt and WINHTTP. */
#ifndef MT5HUB_SHA256_H
#define MT5HUB_SHA256_H

#include <stddef.h>

void sha256(const void *data, size_t len, unsigned char out[32]);

#endif
