/* text.c: see text.h. */
#include "text.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <winhttp.h>

#include "mt5hub.h"

char *utf16_to_utf8(const wchar_t *text, size_t max_bytes, size_t *len, int *error)
{
    /* WC_ERR_INVALID_CHARS: refuse broken UTF-16 rather than send U+FFFD the EA never wrote. */
    int n = WideCharToMultiByte(CP_UTF8, WC_ERR_INVALID_CHARS, text, -1, NULL, 0, NULL, NULL);
    if (n <= 0) {
        *error = MT5HUB_E_ARG;
        return NULL;
    }
    if ((size_t)n - 1 > max_bytes) {
        *error = MT5HUB_E_TOO_LARGE;
        return NULL;
    }
    char *out = malloc((size_t)n);
    if (!out) {
        *error = MT5HUB_E_SYSTEM;
        return NULL;
    }
    WideCharToMultiByte(CP_UTF8, WC_ERR_INVALID_CHARS, text, -1, out, n, NULL, NULL);
    *len = (size_t)n - 1;
    return out;
}

void utf8_to_utf16(const char *text, wchar_t *out, int cap)
{
    if (cap <= 0) return;
    int n = MultiByteToWideChar(CP_UTF8, 0, text, -1, out, cap);
    if (n == 0) {
        /* Too long for out: convert the first cap-1 bytes, which never make more than cap-1
         * UTF-16 units. A character cut in half becomes U+FFFD: fine in a truncated message. */
        int len = (int)strlen(text);
        n = MultiByteToWideChar(CP_UTF8, 0, text, len < cap - 1 ? len : cap - 1, out, cap - 1);
        out[n] = L'\0';
    }
}

/* Our words for the errors an EA user will meet, with what to check; anything else gets the
 * system's text. Winsock codes (100xx, 110xx) reach us through WinHTTP on some Windows versions
 * and in system messages. */
static const struct {
    DWORD code;
    const wchar_t *text;
} known[] = {
    {ERROR_WINHTTP_TIMEOUT, L"timed out: no answer in time (hub down or hung, or a firewall "
                            L"dropping packets?)"},
    {ERROR_WINHTTP_NAME_NOT_RESOLVED, L"host name not found (typo in the URL, or no DNS?)"},
    {ERROR_WINHTTP_CANNOT_CONNECT, L"cannot connect (is the hub running, is the port right?)"},
    {ERROR_WINHTTP_CONNECTION_ERROR, L"connection reset or aborted (hub restarted, or a proxy "
                                     L"or firewall cut it)"},
    {ERROR_WINHTTP_INVALID_SERVER_RESPONSE, L"invalid server response (not an mt5hub hub, or "
                                            L"ws:// to a TLS port?)"},
    {ERROR_WINHTTP_OPERATION_CANCELLED, L"operation cancelled"},
    {ERROR_WINHTTP_SECURE_FAILURE, L"TLS: server certificate rejected"},
    {ERROR_WINHTTP_SECURE_CHANNEL_ERROR, L"TLS handshake failed (untrusted certificate, or "
                                         L"wss:// to a plain ws:// port?)"},
    {ERROR_WINHTTP_SECURE_INVALID_CA, L"TLS: certificate signed by an unknown authority"},
    {ERROR_WINHTTP_SECURE_CERT_CN_INVALID, L"TLS: certificate is for another host name"},
    {ERROR_WINHTTP_SECURE_CERT_DATE_INVALID, L"TLS: certificate expired or not yet valid"},
    {ERROR_WINHTTP_SECURE_INVALID_CERT, L"TLS: invalid certificate"},
    {ERROR_WINHTTP_CLIENT_AUTH_CERT_NEEDED, L"TLS: the server asks for a client certificate"},
    {ERROR_WINHTTP_UNRECOGNIZED_SCHEME, L"unrecognized URL scheme"},
    {ERROR_WINHTTP_INVALID_URL, L"invalid URL"},
    {ERROR_WINHTTP_LOGIN_FAILURE, L"login failure (a proxy asks for credentials?)"},
    {ERROR_WINHTTP_AUTODETECTION_FAILED, L"proxy auto-detection failed"},
    {ERROR_INVALID_HANDLE, L"connection handle closed"},
    {ERROR_NOT_ENOUGH_MEMORY, L"out of memory"},
    {10050, L"network is down"},
    {10051, L"network unreachable (no route to the hub: check the address and the network)"},
    {10053, L"connection aborted by this computer (firewall or antivirus?)"},
    {10054, L"connection reset by the hub or a firewall on the way"},
    {10060, L"connection timed out: the hub's address did not answer (wrong address, hub down, "
            L"or a firewall dropping the port)"},
    {10061, L"connection refused: nothing listens on that port (is the hub running, is the "
            L"port right?)"},
    {10064, L"host is down"},
    {10065, L"host unreachable (no route to the hub's address)"},
    {11001, L"host name not found (typo in the URL, or no DNS?)"},
    {11002, L"host name lookup failed for now (DNS server not answering): retrying"},
};

void describe_error(DWORD code, wchar_t *out, int cap)
{
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++) {
        if (known[i].code == code) {
            _snwprintf(out, (size_t)cap, L"%ls (%lu)", known[i].text, code);
            out[cap - 1] = L'\0';
            return;
        }
    }
    wchar_t sys[256] = L"";
    DWORD flags = FORMAT_MESSAGE_FROM_SYSTEM | FORMAT_MESSAGE_IGNORE_INSERTS;
    HMODULE winhttp = GetModuleHandleW(L"winhttp.dll"); /* holds the texts of 12xxx codes */
    if (winhttp && code >= WINHTTP_ERROR_BASE && code <= WINHTTP_ERROR_LAST)
        flags = FORMAT_MESSAGE_FROM_HMODULE | FORMAT_MESSAGE_IGNORE_INSERTS;
    DWORD n = FormatMessageW(flags, winhttp, code, 0, sys, 256, NULL);
    while (n > 0 && (sys[n - 1] == L'\n' || sys[n - 1] == L'\r' || sys[n - 1] == L'.'))
        sys[--n] = L'\0'; /* system texts end in ".\r\n" */
    _snwprintf(out, (size_t)cap, L"%ls (%lu)", n ? sys : L"error", code);
    out[cap - 1] = L'\0';
}
