/*
 * conn.c: a handle's side of a connection: parsing the URL, the state the exports read and
 * write under the lock, reference counting, and starting threads. The threads themselves (the
 * WebSocket, reconnects, sending) are in io.c.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conn_internal.h"
#include "text.h"

#define DEFAULT_PATH L"/ws/dll"

static volatile LONG running_threads;

/* ---- errors and state ------------------------------------------------------------------ */

/* Caller holds the lock. */
void set_error_locked(conn *c, const wchar_t *fmt, ...)
{
    va_list args;
    va_start(args, fmt);
    _vsnwprintf(c->last_error, ERROR_CAP, fmt, args);
    va_end(args);
    c->last_error[ERROR_CAP - 1] = L'\0';
    c->stats[MT5HUB_STAT_ERRORS]++;
}

/* ---- the lease ------------------------------------------------------------------------ */

ULONGLONG lease_deadline(const conn *c)
{
    return c->lease_ms ? c->last_call + c->lease_ms : ~0ULL;
}

int lease_over_locked(conn *c, ULONGLONG now)
{
    if (c->expired) return 1;
    if (!c->lease_ms || now < lease_deadline(c)) return 0;
    set_error_locked(c, L"no call with this handle for %lu s: its lease ran out and it was "
                        L"closed (did the EA stop without OnDeinit?)",
                     (unsigned long)(c->lease_ms / 1000));
    c->expired = c->stop = 1;
    WakeAllConditionVariable(&c->wake);
    return 1;
}

int conn_touch(conn *c)
{
    AcquireSRWLockExclusive(&c->lock);
    ULONGLONG now = GetTickCount64();
    int alive = !lease_over_locked(c, now);
    if (alive) c->last_call = now;
    ReleaseSRWLockExclusive(&c->lock);
    return alive;
}

int conn_expired(conn *c)
{
    AcquireSRWLockShared(&c->lock);
    int expired = c->expired;
    ReleaseSRWLockShared(&c->lock);
    return expired;
}

int conn_set_lease(conn *c, int seconds)
{
    if (seconds < 0 || seconds > 24 * 3600) return MT5HUB_E_ARG;
    AcquireSRWLockExclusive(&c->lock);
    c->lease_ms = (DWORD)seconds * 1000;
    WakeAllConditionVariable(&c->wake); /* the I/O thread's waits count with the lease */
    ReleaseSRWLockExclusive(&c->lock);
    return 0;
}

/* ---- threads ------------------------------------------------------------------------- */

/* See conn_internal.h: the pin is what makes unloading safe while threads run. */
HANDLE start_thread(LPTHREAD_START_ROUTINE main, void *arg)
{
    HMODULE self;
    if (!GetModuleHandleExW(GET_MODULE_HANDLE_EX_FLAG_FROM_ADDRESS, (LPCWSTR)(void *)main, &self))
        return NULL;
    InterlockedIncrement(&running_threads);
    HANDLE thread = CreateThread(NULL, 0, main, arg, 0, NULL);
    if (!thread) {
        InterlockedDecrement(&running_threads);
        FreeLibrary(self);
    }
    return thread;
}

void thread_exit(void)
{
    HMODULE self;
    GetModuleHandleExW(GET_MODULE_HANDLE_EX_FLAG_FROM_ADDRESS |
                           GET_MODULE_HANDLE_EX_FLAG_UNCHANGED_REFCOUNT,
                       (LPCWSTR)(void *)thread_exit, &self);
    InterlockedDecrement(&running_threads);
    FreeLibraryAndExitThread(self, 0); /* drops start_thread's pin after leaving our code */
}

/* ---- the handle-facing side ------------------------------------------------------------ */

static wchar_t *dup_range(const wchar_t *start, size_t n)
{
    wchar_t *s = malloc((n + 1) * sizeof *s);
    if (s) {
        memcpy(s, start, n * sizeof *s);
        s[n] = L'\0';
    }
    return s;
}

/* ws://host[:port][/path] or wss://...; IPv6 hosts in brackets. Fills host, port, path, secure. */
static int parse_url(conn *c, const wchar_t *url)
{
    const wchar_t *p;
    if (!_wcsnicmp(url, L"wss://", 6)) {
        c->secure = 1, c->port = INTERNET_DEFAULT_HTTPS_PORT, p = url + 6;
    } else if (!_wcsnicmp(url, L"ws://", 5)) {
        c->secure = 0, c->port = INTERNET_DEFAULT_HTTP_PORT, p = url + 5;
    } else {
        return MT5HUB_E_URL;
    }
    const wchar_t *host = p, *host_end;
    if (*p == L'[') {
        host = p + 1;
        host_end = wcschr(host, L']');
        if (!host_end) return MT5HUB_E_URL;
        p = host_end + 1;
    } else {
        while (*p && *p != L':' && *p != L'/') p++;
        host_end = p;
    }
    if (host_end == host) return MT5HUB_E_URL;
    for (const wchar_t *q = host; q < host_end; q++)
        if (*q <= L' ' || wcschr(L"@?#[]", *q)) return MT5HUB_E_URL;
    if (*p == L':') {
        unsigned long port = 0;
        int digits = 0;
        for (p++; *p >= L'0' && *p <= L'9' && digits < 6; p++, digits++)
            port = port * 10 + (unsigned long)(*p - L'0');
        if (!digits || port == 0 || port > 65535) return MT5HUB_E_URL;
        c->port = (INTERNET_PORT)port;
    }
    if (*p && *p != L'/') return MT5HUB_E_URL;
    for (const wchar_t *q = p; *q; q++)
        if (*q <= L' ' || *q == L'#') return MT5HUB_E_URL;
    c->host = dup_range(host, (size_t)(host_end - host));
    c->path = *p ? dup_range(p, wcslen(p)) : dup_range(DEFAULT_PATH, wcslen(DEFAULT_PATH));
    return c->host && c->path ? 0 : MT5HUB_E_SYSTEM;
}

static void conn_free(conn *c)
{
    store_free(&c->tables);
    free(c->host);
    free(c->path);
    if (c->auth_header) SecureZeroMemory(c->auth_header, wcslen(c->auth_header) * sizeof(wchar_t));
    free(c->auth_header);
    free(c);
}

int conn_create(const wchar_t *url, const wchar_t *token, int flags, const unsigned char *pin,
                conn **out)
{
    if (!url || (flags & ~MT5HUB_FLAG_INSECURE_TLS)) return MT5HUB_E_ARG;
    /* A line break in the token would let it inject HTTP headers. */
    if (token && (wcschr(token, L'\r') || wcschr(token, L'\n'))) return MT5HUB_E_ARG;
    conn *c = calloc(1, sizeof *c);
    if (!c) return MT5HUB_E_SYSTEM;
    c->refs = 1;
    c->flags = flags;
    c->state = MT5HUB_STATE_CONNECTING;
    c->max_frame = MT5HUB_MAX_MESSAGE;
    c->send_rate = SEND_RATE;
    c->send_burst = SEND_BURST;
    c->lease_ms = MT5HUB_LEASE_DEFAULT * 1000;
    c->last_call = GetTickCount64();
    InitializeSRWLock(&c->lock);
    InitializeConditionVariable(&c->wake);
    c->rng = (unsigned)GetTickCount64() ^ (unsigned)(ULONG_PTR)c ^ GetCurrentThreadId();
    if (!c->rng) c->rng = 1;
    int rc = parse_url(c, url);
    if (pin) {
        c->pinned = 1;
        memcpy(c->pin, pin, sizeof c->pin);
        if (!rc && !c->secure) rc = MT5HUB_E_URL; /* a pin is about TLS: wss:// only */
    }
    if (!rc && token && *token) {
        static const wchar_t prefix[] = L"Authorization: Bearer ";
        size_t n = wcslen(prefix) + wcslen(token);
        c->auth_header = malloc((n + 1) * sizeof(wchar_t));
        if (c->auth_header)
            _snwprintf(c->auth_header, n + 1, L"%ls%ls", prefix, token);
        else
            rc = MT5HUB_E_SYSTEM;
    }
    if (rc) {
        conn_free(c);
        return rc;
    }
    *out = c;
    return 0;
}

int conn_start(conn *c)
{
    conn_retain(c); /* the I/O thread's */
    HANDLE thread = start_thread(io_main, c);
    if (!thread) {
        conn_release(c);
        return MT5HUB_E_SYSTEM;
    }
    CloseHandle(thread); /* nobody joins it: it cleans up after itself */
    return 0;
}

void conn_stop(conn *c)
{
    AcquireSRWLockExclusive(&c->lock);
    c->stop = 1;
    WakeAllConditionVariable(&c->wake);
    ReleaseSRWLockExclusive(&c->lock);
}

void conn_retain(conn *c)
{
    InterlockedIncrement(&c->refs);
}

void conn_release(conn *c)
{
    if (InterlockedDecrement(&c->refs) == 0) conn_free(c);
}

int conn_put(conn *c, const char *key, const char *src, blob *state)
{
    AcquireSRWLockExclusive(&c->lock);
    int rc = state->len > c->max_frame ? MT5HUB_E_TOO_LARGE
                                       : store_put(&c->tables, key, src, state);
    if (rc == MT5HUB_COALESCED) c->stats[MT5HUB_STAT_COALESCED]++;
    if (rc >= 0) WakeAllConditionVariable(&c->wake);
    ReleaseSRWLockExclusive(&c->lock);
    return rc;
}

void conn_refused(conn *c, const char *why)
{
    wchar_t text[ERROR_CAP - 64];
    utf8_to_utf16(why, text, ERROR_CAP - 64);
    set_error(c, L"table refused, not queued (the hub would refuse it too): %ls", text);
}

int conn_status(conn *c, int *queued)
{
    AcquireSRWLockShared(&c->lock);
    int state = c->state;
    if (queued) *queued = c->tables.dirty;
    ReleaseSRWLockShared(&c->lock);
    return state;
}

int conn_last_error(conn *c, wchar_t *buffer, int size)
{
    AcquireSRWLockShared(&c->lock);
    int len = (int)wcslen(c->last_error);
    if (buffer && size > 0) {
        int n = len < size - 1 ? len : size - 1;
        memcpy(buffer, c->last_error, (size_t)n * sizeof(wchar_t));
        buffer[n] = L'\0';
    }
    ReleaseSRWLockShared(&c->lock);
    return len;
}

long long conn_stat(conn *c, int which)
{
    if (which < 0 || which > MT5HUB_STAT_LAST) return MT5HUB_E_ARG;
    AcquireSRWLockShared(&c->lock);
    long long value = which == MT5HUB_STAT_TABLES ? c->tables.count
                      : which == MT5HUB_STAT_BYTES ? (long long)c->tables.bytes
                      : which == MT5HUB_STAT_SEND_RATE ? (long long)(c->send_rate * 60.0)
                                                   : c->stats[which];
    ReleaseSRWLockShared(&c->lock);
    return value;
}

int conn_threads(void)
{
    return (int)running_threads;
}
