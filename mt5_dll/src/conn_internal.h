/*
 * conn_internal.h: what conn.c (the handle-facing side) and io.c (the threads that own the
 * WebSocket) share. Nothing outside these two files includes it.
 */
#ifndef MT5HUB_CONN_INTERNAL_H
#define MT5HUB_CONN_INTERNAL_H

#include <windows.h>
#include <winhttp.h>

#include "conn.h"
#include "mt5hub.h"
#include "store.h"

#define ERROR_CAP 512
#define SEND_RATE 40.0  /* table frames per second: below the hub's default rate_limit (50) */
#define SEND_BURST 80.0 /* and its rate_burst (100), so a resync never trips the limit */

struct conn {
    volatile LONG refs;

    /* Fixed at open. */
    wchar_t *host;
    INTERNET_PORT port;
    wchar_t *path;
    int secure;
    int flags;
    wchar_t *auth_header; /* "Authorization: Bearer ..." or NULL */
    int pinned;           /* accept exactly the certificate whose SHA-256 is pin */
    unsigned char pin[32];

    SRWLOCK lock;
    CONDITION_VARIABLE wake; /* the I/O thread waits on it for work, stop, or link end */

    /* Guarded by lock. */
    store tables;
    int state;
    int stop;            /* Mt5HubClose was called */
    int link_dead;       /* link over: the reader ended, a send failed, or the hub went silent */
    int reader_done;     /* the reader thread has left its receive loop */
    int closing;         /* we sent our close frame: the hub's close is an answer, not an error */
    int pong_owed;       /* the hub pinged us */
    ULONGLONG last_rx;   /* tick of the last frame from the hub */
    size_t max_frame;    /* largest table state the hub takes: MT5HUB_MAX_MESSAGE until a 1009 */
    size_t largest_sent; /* largest table frame sent on the current link */
    int frame_too_large; /* the hub closed the link with 1009 */
    unsigned link_id;    /* changes when a link ends, to tell a late reader it is too late */
    wchar_t last_error[ERROR_CAP];
    double send_rate;    /* table frames per second: SEND_RATE, or below what the hub said */
    double send_burst;
    int throttled;       /* the hub dropped frames (rate_limited): the pump starts from 0 tokens */
    ULONGLONG last_call; /* tick of the EA's last call with this handle */
    DWORD lease_ms;      /* 0: no lease */
    int expired;         /* the lease ran out: stop is set, and the handle is as good as closed */
    long long stats[MT5HUB_STAT_LAST + 1];

    /* Owned by the I/O thread. */
    HINTERNET session;
    HINTERNET connection;
    HINTERNET ws;
    HANDLE reader;
    DWORD tls_failure; /* WINHTTP_CALLBACK_STATUS_FLAG_* from the last handshake */
    int pin_state;     /* pinned: 1 the certificate was the pinned one, -1 another, 0 not seen */
    unsigned char seen[32]; /* pinned: the SHA-256 of the certificate seen */
    int token_held_back; /* pinned: the request went out on a new connection, without the token */
    unsigned rng;
};

/* Record the last error (and count it). Caller holds c->lock; set_error takes it. */
void set_error_locked(conn *c, const wchar_t *fmt, ...);
#define set_error(c, ...)                   \
    do {                                    \
        AcquireSRWLockExclusive(&(c)->lock); \
        set_error_locked((c), __VA_ARGS__); \
        ReleaseSRWLockExclusive(&(c)->lock); \
    } while (0)

/* If the lease ran out by `now`: mark the conn expired and stopping, and return 1. Caller holds
 * the lock. A deadline for waits: lease_deadline() (ULLONG_MAX without a lease). */
int lease_over_locked(conn *c, ULONGLONG now);
ULONGLONG lease_deadline(const conn *c);

/* Start a thread that runs this DLL's code. It pins the DLL until thread_exit and counts in
 * Mt5HubThreads, so that FreeLibrary never unmaps code a thread still runs. */
HANDLE start_thread(LPTHREAD_START_ROUTINE main, void *arg);
void __attribute__((noreturn)) thread_exit(void);

/* The I/O thread of a conn (io.c); it owns one reference to the conn. */
DWORD WINAPI io_main(void *arg);

#endif
