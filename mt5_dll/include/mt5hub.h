/*
 * mt5hub.h: the exports of mt5hub.dll, for C callers (the test program) and as the reference for
 * the MQL5 #import in mql5/Include/Mt5Hub.mqh. Keep both in step.
 *
 * Every export returns at once: a background thread per handle owns the WebSocket connection.
 * Strings are NUL-terminated UTF-16 (MQL5 `string`); text going to the hub is sent as UTF-8.
 */
#ifndef MT5HUB_H
#define MT5HUB_H

#include <wchar.h>

#ifdef MT5HUB_BUILDING_DLL
#define MT5HUB_API __declspec(dllexport)
#else
#define MT5HUB_API __declspec(dllimport)
#endif

#define MT5HUB_VERSION 1 /* protocol v1; also what Mt5HubVersion() returns */

/* Mt5HubOpen flags */
#define MT5HUB_FLAG_INSECURE_TLS 1 /* accept ANY server certificate: for tests only (anyone on the
                                      path could read the token); see Mt5HubOpenPinned */

/* Mt5HubStatus states */
#define MT5HUB_STATE_CONNECTING 0 /* opening the connection */
#define MT5HUB_STATE_CONNECTED 1  /* WebSocket open and accepted by the hub */
#define MT5HUB_STATE_WAITING 2    /* link down, retrying after a backoff delay; see last error */
#define MT5HUB_STATE_REJECTED 3   /* the hub refused the token (HTTP 401/403); still retrying */

/* Error results (all negative) */
#define MT5HUB_E_HANDLE (-1)    /* unknown or closed handle, or one whose lease ran out */
#define MT5HUB_E_ARG (-2)       /* NULL/empty text, invalid UTF-16, unknown flag, CR/LF in token,
                                   not a SHA-256 fingerprint, a lease out of 0..86400 s */
#define MT5HUB_E_URL (-3)       /* not ws://host[:port][/path] or wss://... (wss:// if pinned) */
#define MT5HUB_E_JSON (-4)      /* not a JSON object (NaN/Infinity are not JSON either) */
#define MT5HUB_E_NOT_TABLE (-5) /* a JSON object without string "key" and "src" */
#define MT5HUB_E_TOO_LARGE (-6) /* over MT5HUB_MAX_MESSAGE bytes of UTF-8, or over a lower limit
                                   learned when the hub closed with 1009 (frame too large) */
#define MT5HUB_E_FULL (-7)      /* the table store is full (MT5HUB_MAX_TABLES or _MAX_BYTES) */
#define MT5HUB_E_LIMIT (-8)     /* MT5HUB_MAX_HANDLES handles are open already */
#define MT5HUB_E_SYSTEM (-9)    /* out of memory, or no thread could be started */
#define MT5HUB_E_INVALID (-10)  /* valid JSON, but a publish the hub would refuse (a rule of
                                   docs/protocol.md): never queued; Mt5HubLastError says which */

/* Mt5HubSend results (besides errors) */
#define MT5HUB_QUEUED 0    /* the table's new state will be sent */
#define MT5HUB_COALESCED 1 /* it replaced a state of the same table that was not sent yet */

/* Mt5HubStat counters (per handle, since open) */
#define MT5HUB_STAT_SENT 0       /* table frames written to the socket */
#define MT5HUB_STAT_COALESCED 1  /* states replaced before they were sent */
#define MT5HUB_STAT_CONNECTS 2   /* successful WebSocket upgrades (reconnects = this - 1) */
#define MT5HUB_STAT_HUB_ERRORS 3 /* {"type":"error"} frames received from the hub */
#define MT5HUB_STAT_ERRORS 4     /* errors recorded as last error, of any kind: watch for changes */
#define MT5HUB_STAT_TABLES 5     /* tables held (their latest state is re-sent after a reconnect) */
#define MT5HUB_STAT_BYTES 6      /* bytes of table state held */
#define MT5HUB_STAT_PINGS 7      /* hub pings answered with a pong */
#define MT5HUB_STAT_RETRY_MS 8   /* the delay before the next reconnect attempt (ms); 0 while
                                    connected */
#define MT5HUB_STAT_SEND_RATE 9  /* table frames per minute it sends at most: 2400 until the hub
                                    says its rate limit is lower (rate_limited), then below it */
#define MT5HUB_STAT_RESENT 10    /* tables queued again because the hub dropped frames over its
                                    rate limit */
#define MT5HUB_STAT_LAST MT5HUB_STAT_RESENT

/* Limits */
#define MT5HUB_MAX_HANDLES 64
#define MT5HUB_MAX_MESSAGE (1024 * 1024) /* the hub's default websocket_max_message_size */
#define MT5HUB_MAX_TABLES 512
#define MT5HUB_MAX_BYTES (16 * 1024 * 1024)
#define MT5HUB_LEASE_DEFAULT 60 /* seconds without a call before a handle is closed; see below */

#ifdef __cplusplus
extern "C" {
#endif

/* Start a connection to `url` (ws:// or wss://; path defaults to /ws/dll) sending
 * `Authorization: Bearer <token>` (no header if token is NULL or empty). Returns a handle > 0 or
 * an error. Connecting happens in the background: watch Mt5HubStatus. */
MT5HUB_API int Mt5HubOpen(const wchar_t *url, const wchar_t *token, int flags);

/* Like Mt5HubOpen(url, token, 0) for a wss:// hub with a self-signed certificate: accept exactly
 * the certificate whose SHA-256 fingerprint is `sha256_fingerprint` (64 hex digits, colons and
 * spaces allowed, e.g. openssl's "sha256 Fingerprint=AB:CD:..."), however its authority, host
 * name and dates, and nothing else. The token is sent only on a connection whose certificate
 * was checked. Returns a handle, MT5HUB_E_ARG (not a fingerprint) or MT5HUB_E_URL (not wss://). */
MT5HUB_API int Mt5HubOpenPinned(const wchar_t *url, const wchar_t *token,
                                const wchar_t *sha256_fingerprint);

/* Store `json` (a publish: an object with string "key" and "src") as the latest state of its
 * table and return: the background thread sends it as soon as the link and rate allow. */
MT5HUB_API int Mt5HubSend(int handle, const wchar_t *json);

/* Current MT5HUB_STATE_*, and in *queued (if not NULL) how many tables wait to be sent. */
MT5HUB_API int Mt5HubStatus(int handle, int *queued);

/* Copy the last error message (NUL-terminated, truncated to fit `size` characters) into `buffer`
 * and return its full length in characters; "" if none yet. buffer may be NULL if size is 0. */
MT5HUB_API int Mt5HubLastError(int handle, wchar_t *buffer, int size);

/* One MT5HUB_STAT_* counter, or MT5HUB_E_HANDLE / MT5HUB_E_ARG. */
MT5HUB_API long long Mt5HubStat(int handle, int which);

/* Invalidate the handle and let its thread finish in the background: it sends what is still
 * queued (up to 2 s, if connected), closes with 1000 and exits. Returns 0 or MT5HUB_E_HANDLE. */
MT5HUB_API int Mt5HubClose(int handle);

/* The DLL's threads still running in this process (per handle an I/O thread and, while
 * connected, a reader), closing ones included. Each holds a reference to the DLL, so while this
 * is above 0 the DLL stays loaded: unloading never pulls the code from under a thread. */
MT5HUB_API int Mt5HubThreads(void);

/* Give the handle a lease of `seconds` (0: none; MT5HUB_LEASE_DEFAULT at open). Every call with
 * the handle (Send, Status, LastError, Stat, SetLease) renews it; once `seconds` pass without
 * one, the handle is closed as by Mt5HubClose: an EA that died without OnDeinit (a critical
 * runtime error) does not leave its tables online forever. An EA whose OnTimer calls Status (or
 * anything else) more often than that needs nothing more. Returns 0, MT5HUB_E_HANDLE or
 * MT5HUB_E_ARG. */
MT5HUB_API int Mt5HubSetLease(int handle, int seconds);

/* MT5HUB_VERSION. */
MT5HUB_API int Mt5HubVersion(void);

#ifdef __cplusplus
}
#endif

#endif
