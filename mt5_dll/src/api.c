/*
 * api.c: the exported functions (see include/mt5hub.h) and the handle table.
 *
 * MQL5 calls these on the EA's own thread, and one loaded DLL serves every EA of the terminal, so:
 * nothing here blocks (no network, no waiting on threads), all state hangs off handles, and the
 * table is locked because EAs on different charts call in parallel.
 */
#define MT5HUB_BUILDING_DLL
#include "mt5hub.h"

#include <stdlib.h>
#include <windows.h>

#include "conn.h"
#include "json.h"
#include "publish.h"
#include "store.h"
#include "text.h"

/* A handle is (generation << 6) | slot, so a closed handle's number is not valid again when its
 * slot is reused: a stale handle in an EA gets MT5HUB_E_HANDLE, not someone else's connection. */
#define SLOT_BITS 6
#if (1 << SLOT_BITS) != MT5HUB_MAX_HANDLES
#error "SLOT_BITS must match MT5HUB_MAX_HANDLES"
#endif
#define MAX_GENERATION 0xFFFFFF

static SRWLOCK table_lock = SRWLOCK_INIT;
static struct {
    conn *conn;
    unsigned generation;
} slots[MT5HUB_MAX_HANDLES];

/* The conn of a handle, with a reference the caller must release; NULL if not open. */
static conn *acquire(int handle)
{
    if (handle <= 0) return NULL;
    unsigned slot = (unsigned)handle & (MT5HUB_MAX_HANDLES - 1);
    unsigned generation = (unsigned)handle >> SLOT_BITS;
    conn *c = NULL;
    AcquireSRWLockShared(&table_lock);
    if (slots[slot].conn && slots[slot].generation == generation) {
        c = slots[slot].conn;
        conn_retain(c);
    }
    ReleaseSRWLockShared(&table_lock);
    if (c && !conn_touch(c)) { /* its lease ran out: closed, though its slot is not free yet */
        conn_release(c);
        c = NULL;
    }
    return c;
}

static int open_handle(const wchar_t *url, const wchar_t *token, int flags,
                       const unsigned char *pin)
{
    conn *c;
    int rc = conn_create(url, token, flags, pin, &c);
    if (rc) return rc;

    int handle = MT5HUB_E_LIMIT;
    AcquireSRWLockExclusive(&table_lock);
    for (unsigned slot = 0; slot < MT5HUB_MAX_HANDLES; slot++) {
        if (slots[slot].conn && conn_expired(slots[slot].conn)) { /* its lease ran out */
            conn_release(slots[slot].conn);
            slots[slot].conn = NULL;
        }
        if (slots[slot].conn) continue;
        slots[slot].generation = slots[slot].generation % MAX_GENERATION + 1;
        slots[slot].conn = c;
        handle = (int)(slots[slot].generation << SLOT_BITS | slot);
        break;
    }
    ReleaseSRWLockExclusive(&table_lock);
    if (handle < 0) {
        conn_release(c);
        return handle;
    }

    rc = conn_start(c);
    if (rc) {
        AcquireSRWLockExclusive(&table_lock);
        slots[(unsigned)handle & (MT5HUB_MAX_HANDLES - 1)].conn = NULL;
        ReleaseSRWLockExclusive(&table_lock);
        conn_release(c);
        return rc;
    }
    return handle;
}

MT5HUB_API int Mt5HubOpen(const wchar_t *url, const wchar_t *token, int flags)
{
    return open_handle(url, token, flags, NULL);
}

/* "AB:CD:...", "abcd...", "sha256 Fingerprint=AB:CD:..." (openssl's output): 32 bytes. */
static int parse_fingerprint(const wchar_t *text, unsigned char out[32])
{
    const wchar_t *eq = wcschr(text, L'=');
    int digits = 0;
    for (const wchar_t *p = eq ? eq + 1 : text; *p; p++) {
        int v = *p >= L'0' && *p <= L'9'   ? *p - L'0'
                : *p >= L'a' && *p <= L'f' ? *p - L'a' + 10
                : *p >= L'A' && *p <= L'F' ? *p - L'A' + 10
                                           : -1;
        if (v < 0) {
            if (*p == L':' || *p == L' ') continue;
            return 0;
        }
        if (digits == 64) return 0;
        out[digits / 2] = (unsigned char)(digits % 2 ? out[digits / 2] | v : v << 4);
        digits++;
    }
    return digits == 64;
}

MT5HUB_API int Mt5HubOpenPinned(const wchar_t *url, const wchar_t *token,
                                const wchar_t *sha256_fingerprint)
{
    unsigned char pin[32];
    if (!sha256_fingerprint || !parse_fingerprint(sha256_fingerprint, pin)) return MT5HUB_E_ARG;
    return open_handle(url, token, 0, pin);
}

MT5HUB_API int Mt5HubSend(int handle, const wchar_t *json)
{
    if (!json || !*json) return MT5HUB_E_ARG;
    /* Convert and check before taking any lock: the only per-byte work on the EA's thread. */
    int rc = 0;
    size_t len = 0;
    char *utf8 = utf16_to_utf8(json, MT5HUB_MAX_MESSAGE, &len, &rc);
    if (!utf8) return rc;
    json_value doc;
    char why[PUBLISH_WHY_CAP];
    rc = publish_check(utf8, len, &doc, why);

    conn *c = acquire(handle);
    if (!c) {
        rc = MT5HUB_E_HANDLE;
    } else if (rc == MT5HUB_E_INVALID) {
        conn_refused(c, why); /* the code alone does not say which rule: the last error does */
    } else if (rc == 0) {
        blob *state = blob_new(utf8, len);
        if (!state)
            rc = MT5HUB_E_SYSTEM;
        else if ((rc = conn_put(c, json_string(json_get(&doc, "key")),
                                json_string(json_get(&doc, "src")), state)) < 0)
            blob_release(state);
    }
    if (c) conn_release(c);
    json_free(&doc); /* (a no-op if the check refused it) */
    free(utf8);
    return rc;
}

MT5HUB_API int Mt5HubStatus(int handle, int *queued)
{
    conn *c = acquire(handle);
    if (!c) return MT5HUB_E_HANDLE;
    int state = conn_status(c, queued);
    conn_release(c);
    return state;
}

MT5HUB_API int Mt5HubLastError(int handle, wchar_t *buffer, int size)
{
    conn *c = acquire(handle);
    if (!c) return MT5HUB_E_HANDLE;
    int len = conn_last_error(c, buffer, size);
    conn_release(c);
    return len;
}

MT5HUB_API long long Mt5HubStat(int handle, int which)
{
    conn *c = acquire(handle);
    if (!c) return MT5HUB_E_HANDLE;
    long long value = conn_stat(c, which);
    conn_release(c);
    return value;
}

MT5HUB_API int Mt5HubClose(int handle)
{
    conn *c = NULL;
    if (handle > 0) {
        unsigned slot = (unsigned)handle & (MT5HUB_MAX_HANDLES - 1);
        AcquireSRWLockExclusive(&table_lock);
        if (slots[slot].conn && slots[slot].generation == (unsigned)handle >> SLOT_BITS) {
            c = slots[slot].conn;
            slots[slot].conn = NULL;
        }
        ReleaseSRWLockExclusive(&table_lock);
    }
    if (!c) return MT5HUB_E_HANDLE;
    conn_stop(c);    /* the thread flushes, closes and exits on its own */
    conn_release(c); /* the table's reference */
    return 0;
}

MT5HUB_API int Mt5HubSetLease(int handle, int seconds)
{
    conn *c = acquire(handle);
    if (!c) return MT5HUB_E_HANDLE;
    int rc = conn_set_lease(c, seconds);
    conn_release(c);
    return rc;
}

MT5HUB_API int Mt5HubThreads(void)
{
    return conn_threads();
}

MT5HUB_API int Mt5HubVersion(void)
{
    return MT5HUB_VERSION;
}

BOOL WINAPI DllMain(HINSTANCE instance, DWORD reason, LPVOID reserved)
{
    (void)reserved;
    /* Nothing to set up or tear down: the loader lock forbids waiting on threads here, and every
     * I/O thread holds a reference to this DLL, so an unload only happens once they have all
     * exited. At process exit the threads are already gone. */
    if (reason == DLL_PROCESS_ATTACH) DisableThreadLibraryCalls(instance);
    return TRUE;
}
