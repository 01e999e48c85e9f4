/*
 * conn.h: one hub connection (one handle): its settings, table store, status, and the background
 * I/O thread that owns the WebSocket.
 *
 * Every function here returns at once; only the I/O thread (and its reader thread) touch WinHTTP.
 * A conn is reference-counted: the handle table holds one reference, the I/O thread another, so
 * Mt5HubClose can drop the handle while the thread finishes on its own.
 */
#ifndef MT5HUB_CONN_H
#define MT5HUB_CONN_H

#include <wchar.h>

#include "store.h"

typedef struct conn conn;

/* Parse the URL and prepare a conn (refs = 1, no thread yet); pin (32 bytes, wss:// only) or
 * NULL. Returns 0, MT5HUB_E_URL, MT5HUB_E_ARG or MT5HUB_E_SYSTEM. */
int conn_create(const wchar_t *url, const wchar_t *token, int flags, const unsigned char *pin,
                conn **out);

/* Start the I/O thread, which takes its own reference and pins the DLL until it exits. */
int conn_start(conn *c);

/* Ask the I/O thread to flush, close and exit. */
void conn_stop(conn *c);

/* An EA call with this handle: renew its lease. Returns 0 if the lease already ran out. */
int conn_touch(conn *c);
int conn_expired(conn *c);
int conn_set_lease(conn *c, int seconds);

void conn_retain(conn *c);
void conn_release(conn *c);

/* Takes over the reference to `state`; see store_put. */
int conn_put(conn *c, const char *key, const char *src, blob *state);
int conn_status(conn *c, int *queued);
/* Record why Mt5HubSend refused a table (UTF-8) as the last error. */
void conn_refused(conn *c, const char *why);
int conn_last_error(conn *c, wchar_t *buffer, int size);
long long conn_stat(conn *c, int which);

/* This DLL's threads still running in the process. */
int conn_threads(void);

#endif
