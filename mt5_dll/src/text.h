/* text.h: UTF-16 <-> UTF-8 at the MQL5 boundary, and readable WinHTTP error messages. */
#ifndef MT5HUB_TEXT_H
#define MT5HUB_TEXT_H

#include <stddef.h>
#include <windows.h>

/* UTF-8 copy of a NUL-terminated UTF-16 string (malloc'd, NUL-terminated, length in *len).
 * Returns NULL and sets *error to MT5HUB_E_ARG (invalid UTF-16, e.g. a lone surrogate),
 * MT5HUB_E_TOO_LARGE (more than max_bytes) or MT5HUB_E_SYSTEM. */
char *utf16_to_utf8(const wchar_t *text, size_t max_bytes, size_t *len, int *error);

/* UTF-16 copy of UTF-8 text into out[0..cap), truncated and always NUL-terminated. Invalid
 * sequences become U+FFFD. */
void utf8_to_utf16(const char *text, wchar_t *out, int cap);

/* "cannot connect (12029)"-style text for a WinHTTP or system error code. */
void describe_error(DWORD code, wchar_t *out, int cap);

#endif
