/*
 * io.c: the threads that own a handle's WebSocket.
 *
 * Threads, per handle:
 * - the I/O thread connects, sends (tables, pings, pongs: it is the only writer of the socket),
 *   waits out backoff delays, and on Mt5HubClose flushes and closes;
 * - while a link is up, a reader thread sits in the blocking WinHttpWebSocketReceive and reports
 *   hub frames (ping, error, close) back through the conn's lock and condition variable.
 * WinHTTP allows one send and one receive at a time on a WebSocket, which is exactly this split.
 *
 * Liveness uses application frames only. The hub never sends protocol pings, and we send none:
 * under Wine a protocol ping arriving while the client sends breaks the link.
 */
#include <stdlib.h>
#include <string.h>

#include "conn_internal.h"
#include "json.h"
#include "sha256.h"
#include "text.h"

#define USER_AGENT L"mt5hub-dll/1"
#define CONNECT_TIMEOUT_MS 10000 /* resolve, connect, and each send */
#define RECEIVE_TIMEOUT_MS 30000 /* Windows' default, above PING_IDLE_MS */
#define HANDSHAKE_TIMEOUT_MS 10000 /* the TLS and upgrade answers: a hub that accepts TCP and
                                      stays silent is given up on (Wine waits forever without) */
#define BACKOFF_FIRST_MS 500
#define BACKOFF_MAX_MS 4000 /* a dashboard is live again seconds after the hub's return */
#define STABLE_LINK_MS 10000 /* a link that lived this long resets the backoff */
#define PING_IDLE_MS 10000   /* no frame from the hub for this long: send {"type":"ping"} */
#define DEAD_LINK_MS 25000   /* still nothing (two pings unanswered): drop the link, reconnect */
#define CLOSE_FLUSH_MS 2000  /* on Mt5HubClose, how long the queue may still be sent */
#define READER_JOIN_MS 2000  /* how long the hub may take to answer our close frame */
#define MAX_INBOUND (1024 * 1024)
#define RATE_MARGIN 0.9       /* after rate_limited: send at 90% of the hub's rate_limit */
#define BURST_MARGIN 0.8      /* and 80% of its rate_burst */
#define RESEND_WINDOW_MS 3000 /* frames sent this recently may be among those the hub dropped: it
                                 says so at most once a second, and the news takes a round trip */

#define WSAETIMEDOUT_CODE 10060 /* (winsock2.h is not needed for one number) */

#ifndef WINHTTP_OPTION_ENABLE_HTTP_PROTOCOL /* not in older mingw-w64 headers */
#define WINHTTP_OPTION_ENABLE_HTTP_PROTOCOL 133
#endif

static const char PING[] = "{\"type\":\"ping\"}";
static const char PONG[] = "{\"type\":\"pong\"}";

/* ---- errors and state ------------------------------------------------------------------ */

static void set_winhttp_error(conn *c, const wchar_t *what, DWORD code)
{
    wchar_t text[256];
    describe_error(code, text, 256);
    set_error(c, L"%ls %ls:%u: %ls", what, c->host, (unsigned)c->port, text);
}

static void set_state(conn *c, int state)
{
    AcquireSRWLockExclusive(&c->lock);
    c->state = state;
    ReleaseSRWLockExclusive(&c->lock);
}

static int stop_requested(conn *c)
{
    AcquireSRWLockExclusive(&c->lock);
    lease_over_locked(c, GetTickCount64());
    int stop = c->stop;
    ReleaseSRWLockExclusive(&c->lock);
    return stop;
}

/* Sleep up to ms, waking early on Mt5HubClose or when the lease runs out. Returns nonzero if
 * stop was requested. */
static int wait_for_stop(conn *c, DWORD ms)
{
    ULONGLONG deadline = GetTickCount64() + ms;
    AcquireSRWLockExclusive(&c->lock);
    for (ULONGLONG now; !c->stop && !lease_over_locked(c, now = GetTickCount64()) &&
                        now < deadline;) {
        ULONGLONG until = lease_deadline(c) < deadline ? lease_deadline(c) : deadline;
        SleepConditionVariableSRW(&c->wake, &c->lock, (DWORD)(until - now), 0);
    }
    int stop = c->stop;
    ReleaseSRWLockExclusive(&c->lock);
    return stop;
}

/* ---- handshake ------------------------------------------------------------------------- */

/* Pinned: compare the SHA-256 of the server's certificate (DER) with the pin. */
static void check_pin(conn *c, HINTERNET request)
{
    PCCERT_CONTEXT cert = NULL;
    DWORD size = sizeof cert;
    c->pin_state = 0;
    if (!WinHttpQueryOption(request, WINHTTP_OPTION_SERVER_CERT_CONTEXT, &cert, &size) || !cert)
        return;
    sha256(cert->pbCertEncoded, cert->cbCertEncoded, c->seen);
    c->pin_state = memcmp(c->seen, c->pin, sizeof c->pin) ? -1 : 1;
    if (c->pin_state < 0) { /* never keep that connection for a later request (with the token) */
        DWORD no_reuse = WINHTTP_DISABLE_KEEP_ALIVE;
        WinHttpSetOption(request, WINHTTP_OPTION_DISABLE_FEATURE, &no_reuse, sizeof no_reuse);
    }
    /* crypt32 is WinHTTP's, loaded already: no import of our own for one call. */
    typedef BOOL(WINAPI * free_fn)(PCCERT_CONTEXT);
    HMODULE crypt32 = GetModuleHandleW(L"crypt32.dll");
    free_fn cert_free = crypt32 ? (free_fn)(void *)GetProcAddress(crypt32,
                                                                  "CertFreeCertificateContext")
                                : NULL;
    if (cert_free) cert_free(cert);
}

/* Sync-mode WinHTTP calls this on the calling thread during WinHttpSendRequest: why it rejected a
 * certificate, and, for a pinned handle, the moments to hold the token back and to check the
 * certificate. */
static void CALLBACK on_status(HINTERNET h, DWORD_PTR context, DWORD status, LPVOID info,
                               DWORD info_len)
{
    conn *c = (conn *)context;
    if (status == WINHTTP_CALLBACK_STATUS_SECURE_FAILURE && info && info_len >= sizeof(DWORD)) {
        c->tls_failure = *(DWORD *)info;
    } else if (status == WINHTTP_CALLBACK_STATUS_CONNECTING_TO_SERVER && c->pinned &&
               c->auth_header) {
        /* A new connection, whose certificate nobody checked yet: this request goes without
         * the token (WinHTTP writes the request after connecting). The upgrade normally reuses
         * the connection probe_certificate checked, and never comes here. */
        WinHttpAddRequestHeaders(h, L"Authorization:", (DWORD)-1L, WINHTTP_ADDREQ_FLAG_REPLACE);
        c->token_held_back = 1;
    } else if (status == WINHTTP_CALLBACK_STATUS_SENDING_REQUEST && c->pinned) {
        check_pin(c, h);
    }
}

static void format_fingerprint(const unsigned char hash[32], wchar_t out[97])
{
    for (int i = 0; i < 32; i++) _snwprintf(out + 3 * i, 4, L"%02X:", hash[i]);
    out[95] = L'\0';
}

/* Why the certificate was refused, from the secure-failure flags; NULL if WinHTTP did not say
 * (Wine does not). */
static const wchar_t *certificate_problem(DWORD flags)
{
    if (flags & WINHTTP_CALLBACK_STATUS_FLAG_INVALID_CA) return L"signed by an unknown authority";
    if (flags & WINHTTP_CALLBACK_STATUS_FLAG_CERT_CN_INVALID) return L"for another host name";
    if (flags & WINHTTP_CALLBACK_STATUS_FLAG_CERT_DATE_INVALID) return L"expired or not yet valid";
    if (flags & WINHTTP_CALLBACK_STATUS_FLAG_CERT_REVOKED) return L"revoked";
    return flags ? L"not acceptable" : NULL;
}

static void set_tls_error(conn *c, DWORD code)
{
    const wchar_t *problem = certificate_problem(c->tls_failure);
    wchar_t text[256];
    describe_error(code, text, 256);
    if (problem)
        set_error(c, L"TLS: the certificate of %ls:%u is %ls (%ls). Use a certificate Windows "
                     L"trusts, or pin a self-signed one by its SHA-256 (Mt5HubOpenPinned; the hub "
                     L"logs it at start). MT5HUB_FLAG_INSECURE_TLS is for tests only",
                  c->host, (unsigned)c->port, problem, text);
    else
        set_error(c, L"TLS with %ls:%u failed: %ls. If the hub uses a self-signed certificate, "
                     L"pin it by its SHA-256 (Mt5HubOpenPinned; the hub logs it at start). "
                     L"MT5HUB_FLAG_INSECURE_TLS is for tests only",
                  c->host, (unsigned)c->port, text);
}

enum { LINK_FAILED, LINK_REJECTED, LINK_UP };

/* Read an answer to its end, so that WinHTTP keeps the connection for the next request. */
static void drain(HINTERNET request)
{
    char buf[4096];
    DWORD n = 0;
    for (int i = 0; i < 16 && WinHttpReadData(request, buf, sizeof buf, &n) && n; i++) continue;
}

static void set_pin_error(conn *c)
{
    wchar_t seen[97];
    format_fingerprint(c->seen, seen);
    if (c->pin_state < 0)
        set_error(c, L"TLS: the certificate of %ls:%u is not the pinned one (the token was not "
                     L"sent): its SHA-256 is %ls",
                  c->host, (unsigned)c->port, seen);
    else
        set_error(c, L"TLS: the certificate of %ls:%u could not be read to compare it with the "
                     L"pin (the token was not sent)",
                  c->host, (unsigned)c->port);
}

/* Pinned: a plain GET of the WebSocket path, without the token, to see the certificate on a new
 * connection. The hub answers 426 and keeps the connection (it closes one after refusing an
 * upgrade, which is why the upgrade itself cannot be the probe); the upgrade with the token
 * follows on it. Returns 1 if the certificate is the pinned one. */
static int probe_certificate(conn *c)
{
    int ok = 0;
    HINTERNET request = WinHttpOpenRequest(c->connection, L"GET", c->path, NULL,
                                           WINHTTP_NO_REFERER, WINHTTP_DEFAULT_ACCEPT_TYPES,
                                           WINHTTP_FLAG_SECURE);
    if (!request) {
        set_winhttp_error(c, L"cannot open a request to", GetLastError());
        return 0;
    }
    DWORD ignore = SECURITY_FLAG_IGNORE_UNKNOWN_CA | SECURITY_FLAG_IGNORE_CERT_CN_INVALID |
                   SECURITY_FLAG_IGNORE_CERT_DATE_INVALID | SECURITY_FLAG_IGNORE_CERT_WRONG_USAGE;
    WinHttpSetOption(request, WINHTTP_OPTION_SECURITY_FLAGS, &ignore, sizeof ignore);
    DWORD handshake_ms = HANDSHAKE_TIMEOUT_MS;
    WinHttpSetOption(request, WINHTTP_OPTION_RECEIVE_RESPONSE_TIMEOUT, &handshake_ms,
                     sizeof handshake_ms);
    c->tls_failure = 0;
    c->pin_state = 0;
    DWORD_PTR context = (DWORD_PTR)c;
    WinHttpSetOption(request, WINHTTP_OPTION_CONTEXT_VALUE, &context, sizeof context);
    WinHttpSetStatusCallback(request, on_status,
                             WINHTTP_CALLBACK_FLAG_SECURE_FAILURE |
                                 WINHTTP_CALLBACK_FLAG_SEND_REQUEST,
                             0);
    if (!WinHttpSendRequest(request, WINHTTP_NO_ADDITIONAL_HEADERS, 0, WINHTTP_NO_REQUEST_DATA, 0,
                            0, 0) ||
        !WinHttpReceiveResponse(request, NULL)) {
        DWORD code = GetLastError();
        if (c->pin_state < 0)
            set_pin_error(c);
        else if (code == ERROR_WINHTTP_TIMEOUT || code == WSAETIMEDOUT_CODE)
            set_error(c, L"%ls:%u did not answer within %u s: wrong address or port, hub down or "
                         L"hung, or a firewall dropping it",
                      c->host, (unsigned)c->port, HANDSHAKE_TIMEOUT_MS / 1000);
        else
            set_winhttp_error(c, L"cannot reach", code);
    } else if (c->pin_state != 1) {
        set_pin_error(c);
    } else {
        drain(request); /* so that WinHTTP keeps the connection for the upgrade */
        ok = 1;
    }
    WinHttpCloseHandle(request);
    return ok;
}

/* One upgrade request on c->connection. Pinned: sets *again if it went out on a new connection
 * (the probe's was gone), which got it without the token: probe again. */
static int upgrade(conn *c, int *again)
{
    int result = LINK_FAILED;
    HINTERNET request = NULL;
    *again = 0;
    request = WinHttpOpenRequest(c->connection, L"GET", c->path, NULL, WINHTTP_NO_REFERER,
                                 WINHTTP_DEFAULT_ACCEPT_TYPES, c->secure ? WINHTTP_FLAG_SECURE : 0);
    if (!request) {
        set_winhttp_error(c, L"cannot open a request to", GetLastError());
        goto done;
    }
    if (c->secure) {
        /* Pinned: the pin decides, not the authority, host name or dates. */
        if ((c->flags & MT5HUB_FLAG_INSECURE_TLS) || c->pinned) {
            DWORD ignore = SECURITY_FLAG_IGNORE_UNKNOWN_CA | SECURITY_FLAG_IGNORE_CERT_CN_INVALID |
                           SECURITY_FLAG_IGNORE_CERT_DATE_INVALID |
                           SECURITY_FLAG_IGNORE_CERT_WRONG_USAGE;
            WinHttpSetOption(request, WINHTTP_OPTION_SECURITY_FLAGS, &ignore, sizeof ignore);
        }
        c->tls_failure = 0;
        c->pin_state = c->token_held_back = 0;
        DWORD_PTR context = (DWORD_PTR)c;
        WinHttpSetOption(request, WINHTTP_OPTION_CONTEXT_VALUE, &context, sizeof context);
        DWORD events = WINHTTP_CALLBACK_FLAG_SECURE_FAILURE;
        if (c->pinned)
            events |= WINHTTP_CALLBACK_FLAG_CONNECT_TO_SERVER | WINHTTP_CALLBACK_FLAG_SEND_REQUEST;
        WinHttpSetStatusCallback(request, on_status, events, 0);
    }
    /* Without it Wine waits for the upgrade answer forever; Windows' default is 30 s. */
    DWORD handshake_ms = HANDSHAKE_TIMEOUT_MS;
    WinHttpSetOption(request, WINHTTP_OPTION_RECEIVE_RESPONSE_TIMEOUT, &handshake_ms,
                     sizeof handshake_ms);
    if (!WinHttpSetOption(request, WINHTTP_OPTION_UPGRADE_TO_WEB_SOCKET, NULL, 0)) {
        set_winhttp_error(c, L"no WebSocket support in WinHTTP for", GetLastError());
        goto done;
    }
    const wchar_t *headers = c->auth_header ? c->auth_header : WINHTTP_NO_ADDITIONAL_HEADERS;
    DWORD headers_len = c->auth_header ? (DWORD)-1L : 0; /* -1: NUL-terminated */
    ULONGLONG started = GetTickCount64();
    BOOL sent = WinHttpSendRequest(request, headers, headers_len, WINHTTP_NO_REQUEST_DATA, 0, 0, 0);
    if (!sent || !WinHttpReceiveResponse(request, NULL)) {
        DWORD code = GetLastError();
        /* A receive that timed out is WSAETIMEDOUT under Wine, ERROR_WINHTTP_TIMEOUT on Windows;
         * a TLS handshake that got no answer is a secure channel error that took that long. */
        int timed_out = code == ERROR_WINHTTP_TIMEOUT || code == WSAETIMEDOUT_CODE ||
                        (code == ERROR_WINHTTP_SECURE_CHANNEL_ERROR && !c->tls_failure &&
                         GetTickCount64() - started >= HANDSHAKE_TIMEOUT_MS - 1000);
        if (timed_out && sent)
            set_error(c, L"%ls:%u accepted the connection but did not answer the WebSocket "
                         L"handshake within %u s: is it the hub (URL, port), is it hung?",
                      c->host, (unsigned)c->port, HANDSHAKE_TIMEOUT_MS / 1000);
        else if (timed_out && c->secure)
            set_error(c, L"%ls:%u did not answer the connection or TLS handshake within %u s: "
                         L"wrong address or port, hub down or hung, or a firewall dropping it",
                      c->host, (unsigned)c->port, HANDSHAKE_TIMEOUT_MS / 1000);
        else if (c->secure && (c->tls_failure || code == ERROR_WINHTTP_SECURE_FAILURE ||
                               code == ERROR_WINHTTP_SECURE_CHANNEL_ERROR))
            set_tls_error(c, code);
        else
            set_winhttp_error(c, L"cannot reach", code);
        goto done;
    }

    if (c->pinned && c->pin_state != 1) {
        set_pin_error(c);
        goto done;
    }
    DWORD status = 0, size = sizeof status;
    WinHttpQueryHeaders(request, WINHTTP_QUERY_STATUS_CODE | WINHTTP_QUERY_FLAG_NUMBER,
                        WINHTTP_HEADER_NAME_BY_INDEX, &status, &size, WINHTTP_NO_HEADER_INDEX);
    if (c->token_held_back) { /* the probe's connection was gone: probe again */
        *again = 1;
        goto done;
    }
    if (status == 401 || status == 403) {
        set_error(c, L"the hub refused the token (HTTP %lu%ls)", status,
                  status == 401 ? L": no token given" : L": token not valid");
        result = LINK_REJECTED;
        goto done;
    }
    if (status != 101) {
        set_error(c, L"the hub answered HTTP %lu instead of a WebSocket upgrade: is the URL path "
                     L"right (%ls)?",
                  status, c->path);
        goto done;
    }
    c->ws = WinHttpWebSocketCompleteUpgrade(request, 0);
    if (!c->ws) {
        set_winhttp_error(c, L"WebSocket upgrade failed with", GetLastError());
        goto done;
    }
    /* The reader waits for hub frames as long as it takes: our pings and DEAD_LINK_MS decide
     * when a quiet link is dead. Should a WinHTTP version refuse this, RECEIVE_TIMEOUT_MS is
     * still longer than the ping interval, so an idle but healthy link never times out. */
    DWORD no_timeout = 0;
    WinHttpSetOption(c->ws, WINHTTP_OPTION_RECEIVE_TIMEOUT, &no_timeout, sizeof no_timeout);
    result = LINK_UP;
done:
    if (request) WinHttpCloseHandle(request); /* the WebSocket handle lives on without it */
    return result;
}

/* Connect and upgrade to a WebSocket; on LINK_UP c->connection and c->ws are open. */
static int open_link(conn *c)
{
    c->connection = WinHttpConnect(c->session, c->host, c->port, 0);
    if (!c->connection) {
        set_winhttp_error(c, L"cannot connect to", GetLastError());
        return LINK_FAILED;
    }
    int result = LINK_FAILED, again = 1;
    for (int tries = 0; again && tries < 3; tries++) {
        if (c->pinned && !probe_certificate(c)) {
            again = 0; /* it said why */
            break;
        }
        result = upgrade(c, &again);
    }
    if (again)
        set_error(c, L"TLS: the certificate of %ls:%u is the pinned one, but the connection it "
                     L"was checked on was closed each time before the token could follow",
                  c->host, (unsigned)c->port);
    if (result != LINK_UP) {
        WinHttpCloseHandle(c->connection);
        c->connection = NULL;
    }
    return result;
}

/* ---- the reader thread ----------------------------------------------------------------- */

/* What a reader needs. It holds its own reference to the conn: a reader stuck in a receive
 * may be left behind by close_link and outlive its link (and even the handle). */
typedef struct reader_args {
    conn *c;
    HINTERNET ws;
    unsigned link; /* the conn's link_id while this reader's link was current */
} reader_args;

/* Caller holds the lock. A reader whose link is over must not touch the next link's state. */
static int is_current(const conn *c, const reader_args *r)
{
    return c->link_id == r->link;
}

static const wchar_t *close_meaning(USHORT code)
{
    switch (code) {
    case 1000: return L"normal close";
    case 1001: return L"hub shutting down";
    case 1008: return L"flood: over the rate limit for too long";
    case 1009: return L"frame too large";
    case 1011: return L"hub internal error";
    case 4008: return L"heartbeat timeout";
    default: return L"";
    }
}

static void on_hub_close(conn *c, const reader_args *r)
{
    USHORT code = 0;
    char reason[124] = ""; /* a close reason is at most 123 bytes */
    DWORD reason_len = 0;
    WinHttpWebSocketQueryCloseStatus(r->ws, &code, reason, sizeof reason - 1, &reason_len);
    reason[reason_len < sizeof reason ? reason_len : sizeof reason - 1] = '\0';
    wchar_t wide_reason[124];
    utf8_to_utf16(reason, wide_reason, 124);
    AcquireSRWLockExclusive(&c->lock);
    if (is_current(c, r) && !c->closing) {
        set_error_locked(c, L"the hub closed the link: %u %ls%ls%ls", (unsigned)code,
                         close_meaning(code), *wide_reason ? L": " : L"", wide_reason);
        if (code == 1009) c->frame_too_large = 1;
    }
    ReleaseSRWLockExclusive(&c->lock);
}

/* The hub dropped frames over its rate limit: it says so at most once a second, so which ones is
 * not known. Slow down below its limit (it says the limit; an older hub does not, then halve) and
 * send again every table sent in the last RESEND_WINDOW_MS, so the latest state of every table
 * still arrives. Caller holds the lock. */
static void on_rate_limited(conn *c, const json_value *limit, const json_value *burst)
{
    if (limit && limit->type == JSON_NUMBER && limit->number > 0) {
        double rate = limit->number * RATE_MARGIN;
        if (rate < c->send_rate) c->send_rate = rate;
    } else {
        c->send_rate /= 2;
    }
    if (c->send_rate < 0.1) c->send_rate = 0.1;
    if (burst && burst->type == JSON_NUMBER && burst->number >= 1) {
        double most = (double)(long long)(burst->number * BURST_MARGIN);
        if (most < 1) most = 1;
        if (most < c->send_burst) c->send_burst = most;
    }
    c->throttled = 1;
    ULONGLONG now = GetTickCount64();
    int marked = store_mark_sent_since(&c->tables, now > RESEND_WINDOW_MS ? now - RESEND_WINDOW_MS
                                                                        : 0);
    c->stats[MT5HUB_STAT_RESENT] += marked;
    WakeAllConditionVariable(&c->wake);
}

static void on_hub_message(conn *c, const reader_args *r, const char *text, size_t len)
{
    json_value msg;
    if (!json_parse(text, len, &msg, NULL)) return;
    const char *type = json_string(json_get(&msg, "type"));
    if (type && !strcmp(type, "ping")) {
        AcquireSRWLockExclusive(&c->lock);
        if (is_current(c, r)) {
            c->pong_owed = 1;
            WakeAllConditionVariable(&c->wake);
        }
        ReleaseSRWLockExclusive(&c->lock);
    } else if (type && !strcmp(type, "error")) {
        const char *code8 = json_string(json_get(&msg, "code"));
        const char *detail8 = json_string(json_get(&msg, "detail"));
        wchar_t code[64], detail[400];
        utf8_to_utf16(code8 ? code8 : "?", code, 64);
        utf8_to_utf16(detail8 ? detail8 : "", detail, 400);
        AcquireSRWLockExclusive(&c->lock);
        if (is_current(c, r)) {
            int limited = code8 && !strcmp(code8, "rate_limited");
            if (limited) on_rate_limited(c, json_get(&msg, "limit"), json_get(&msg, "burst"));
            set_error_locked(c, L"hub error %ls: %ls%ls", code, detail,
                             limited ? L" (slowing down, sending the dropped tables again)" : L"");
            c->stats[MT5HUB_STAT_HUB_ERRORS]++;
        }
        ReleaseSRWLockExclusive(&c->lock);
    }
    /* "pong" and unknown types: receiving them already proved the link alive. */
    json_free(&msg);
}

static DWORD WINAPI reader_main(void *arg)
{
    reader_args *r = arg;
    conn *c = r->c;
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    int oversized = 0; /* a message over MAX_INBOUND is read to its end and dropped */
    while (buf) {
        if (len == cap) {
            char *grown = cap < MAX_INBOUND ? realloc(buf, cap * 2) : NULL;
            if (grown) {
                buf = grown;
                cap *= 2;
            } else {
                oversized = 1;
                len = 0;
            }
        }
        DWORD n = 0;
        WINHTTP_WEB_SOCKET_BUFFER_TYPE type;
        DWORD err = WinHttpWebSocketReceive(r->ws, buf + len, (DWORD)(cap - len), &n, &type);

        AcquireSRWLockExclusive(&c->lock);
        int current = is_current(c, r);
        if (current && !err) c->last_rx = GetTickCount64();
        if (current && err && !c->closing) {
            wchar_t text[256];
            describe_error(err, text, 256);
            set_error_locked(c, L"link to %ls:%u lost: %ls", c->host, (unsigned)c->port, text);
        }
        ReleaseSRWLockExclusive(&c->lock);
        if (!current || err) break; /* an abandoned reader never touches the handle again */

        if (type == WINHTTP_WEB_SOCKET_CLOSE_BUFFER_TYPE) {
            on_hub_close(c, r);
            break;
        }
        len += n;
        if (type == WINHTTP_WEB_SOCKET_UTF8_FRAGMENT_BUFFER_TYPE ||
            type == WINHTTP_WEB_SOCKET_BINARY_FRAGMENT_BUFFER_TYPE)
            continue;
        if (type == WINHTTP_WEB_SOCKET_UTF8_MESSAGE_BUFFER_TYPE && !oversized)
            on_hub_message(c, r, buf, len);
        len = 0;
        oversized = 0;
    }
    free(buf);
    AcquireSRWLockExclusive(&c->lock);
    if (is_current(c, r)) {
        c->link_dead = c->reader_done = 1;
        WakeAllConditionVariable(&c->wake);
    }
    ReleaseSRWLockExclusive(&c->lock);
    conn_release(c);
    free(r);
    thread_exit();
}

/* ---- the I/O thread -------------------------------------------------------------------- */

static int send_text(conn *c, const char *text, size_t len)
{
    DWORD err = WinHttpWebSocketSend(c->ws, WINHTTP_WEB_SOCKET_UTF8_MESSAGE_BUFFER_TYPE,
                                     (void *)text, (DWORD)len);
    if (err) {
        wchar_t msg[256];
        describe_error(err, msg, 256);
        AcquireSRWLockExclusive(&c->lock);
        if (!c->reader_done) /* else the reader already said why */
            set_error_locked(c, L"sending to %ls:%u failed: %ls", c->host, (unsigned)c->port, msg);
        ReleaseSRWLockExclusive(&c->lock);
    }
    return err == 0;
}

static DWORD min_ms(DWORD a, ULONGLONG b)
{
    return b < a ? (DWORD)b : a;
}

/* Send while the link is up: pongs first, then tables (rate-limited), pings when the hub has been
 * quiet. Returns when the link is dead, or on stop once the queue is flushed or CLOSE_FLUSH_MS
 * has passed. */
static void pump(conn *c)
{
    AcquireSRWLockShared(&c->lock);
    double tokens = c->send_burst; /* a new link: the hub's bucket is full */
    ReleaseSRWLockShared(&c->lock);
    ULONGLONG refilled = GetTickCount64(), last_ping = 0, flush_deadline = 0;
    for (;;) {
        const char *text = NULL;
        size_t len = 0;
        blob *table = NULL;

        AcquireSRWLockExclusive(&c->lock);
        for (;;) {
            ULONGLONG now = GetTickCount64();
            tokens += (double)(now - refilled) * c->send_rate / 1000.0;
            if (tokens > c->send_burst) tokens = c->send_burst;
            if (c->throttled) { /* the hub's bucket is empty right now */
                c->throttled = 0;
                if (tokens > 0) tokens = 0;
            }
            refilled = now;

            if (c->link_dead) break;
            lease_over_locked(c, now); /* then it stops like Mt5HubClose: flush, close */
            if (c->stop) {
                if (!flush_deadline) flush_deadline = now + CLOSE_FLUSH_MS;
                if (!c->tables.dirty || now >= flush_deadline) break;
            }
            if (c->pong_owed) {
                c->pong_owed = 0;
                c->stats[MT5HUB_STAT_PINGS]++;
                tokens -= 1.0; /* the hub counts every frame against its rate limit */
                text = PONG, len = sizeof PONG - 1;
                break;
            }
            if (now - c->last_rx >= DEAD_LINK_MS) {
                set_error_locked(c, L"no answer from the hub for %u s: reconnecting",
                                 DEAD_LINK_MS / 1000);
                c->link_dead = 1;
                break;
            }
            ULONGLONG ping_due = (c->last_rx > last_ping ? c->last_rx : last_ping) + PING_IDLE_MS;
            if (!c->stop && now >= ping_due) {
                last_ping = now;
                tokens -= 1.0;
                text = PING, len = sizeof PING - 1;
                break;
            }
            if (c->tables.dirty && tokens >= 1.0) {
                table = store_take(&c->tables, now);
                tokens -= 1.0;
                text = table->data, len = table->len;
                break;
            }
            /* Nothing to do yet: sleep until the next deadline or until someone wakes us. */
            DWORD wait = min_ms(INFINITE - 1, ping_due - now);
            wait = min_ms(wait, c->last_rx + DEAD_LINK_MS - now);
            if (c->tables.dirty) /* waiting for the rate limit's next token */
                wait = min_ms(wait, (ULONGLONG)((1.0 - tokens) * 1000.0 / c->send_rate) + 1);
            if (flush_deadline) wait = min_ms(wait, flush_deadline - now);
            if (!c->stop) wait = min_ms(wait, lease_deadline(c) - now);
            SleepConditionVariableSRW(&c->wake, &c->lock, wait, 0);
        }
        ReleaseSRWLockExclusive(&c->lock);

        if (!text) return; /* link dead, or stop and flushed */
        int sent = send_text(c, text, len);
        if (table) {
            blob_release(table);
            if (sent) {
                AcquireSRWLockExclusive(&c->lock);
                c->stats[MT5HUB_STAT_SENT]++;
                if (len > c->largest_sent) c->largest_sent = len;
                ReleaseSRWLockExclusive(&c->lock);
            }
            /* A table whose send failed is re-sent anyway: reconnecting marks all tables dirty. */
        }
        if (!sent) return;
    }
}

/* Close the WebSocket and let the reader thread end; never waits more than 2 x READER_JOIN_MS. */
static void close_link(conn *c)
{
    AcquireSRWLockExclusive(&c->lock);
    c->closing = 1;
    if (!c->stop) c->state = MT5HUB_STATE_WAITING;
    int reader_done = c->reader_done;
    ReleaseSRWLockExclusive(&c->lock);

    if (reader_done) {
        /* The hub closed or the socket failed: complete the close handshake if there is one. */
        WinHttpWebSocketClose(c->ws, WINHTTP_WEB_SOCKET_SUCCESS_CLOSE_STATUS, NULL, 0);
    } else {
        /* Send our close frame; the hub's answer ends the reader's pending receive. */
        WinHttpWebSocketShutdown(c->ws, WINHTTP_WEB_SOCKET_SUCCESS_CLOSE_STATUS, NULL, 0);
    }
    int joined = WaitForSingleObject(c->reader, READER_JOIN_MS) == WAIT_OBJECT_0;

    /* Whatever the reader still reports is about a dead link now: is_current() turns it away. */
    AcquireSRWLockExclusive(&c->lock);
    c->link_id++;
    ReleaseSRWLockExclusive(&c->lock);
    /* On Windows closing the handle fails a pending receive. Wine's receive keeps waiting until
     * the peer sends something or TCP gives up (a hub that hangs): then the reader is left to
     * finish on its own, with its own references, and we reconnect meanwhile. */
    WinHttpCloseHandle(c->ws);
    c->ws = NULL;
    if (!joined) WaitForSingleObject(c->reader, READER_JOIN_MS);
    CloseHandle(c->reader);
    c->reader = NULL;
    WinHttpCloseHandle(c->connection);
    c->connection = NULL;
}

/* The hub closed with 1009: some frame of that link was over its websocket_max_message_size,
 * which is lower than ours. Re-sending that table after each reconnect would loop forever, so
 * learn a lower limit: below the largest frame of that link (the culprit or larger). */
static void learn_frame_limit(conn *c)
{
    AcquireSRWLockExclusive(&c->lock);
    if (c->frame_too_large && c->largest_sent > 0) {
        c->max_frame = c->largest_sent - 1;
        int dropped = store_drop_larger(&c->tables, c->max_frame);
        set_error_locked(c, L"the hub refused a frame as too large (1009): table states over %lu "
                            L"bytes are refused from now on (%d dropped)",
                         (unsigned long)c->max_frame, dropped);
    }
    c->frame_too_large = 0;
    c->largest_sent = 0;
    ReleaseSRWLockExclusive(&c->lock);
}

static unsigned next_random(conn *c)
{
    /* xorshift32: only for jitter, so that many EAs do not reconnect in step. */
    c->rng ^= c->rng << 13;
    c->rng ^= c->rng >> 17;
    c->rng ^= c->rng << 5;
    return c->rng;
}

/* Exponential backoff with "equal jitter": between half and all of 0.5 s * 2^attempt, capped at
 * BACKOFF_MAX_MS (so 0.25-0.5 s, 0.5-1 s, 1-2 s, then 2-4 s for as long as the hub is away). */
static DWORD backoff_ms(conn *c, unsigned attempt)
{
    DWORD cap = BACKOFF_FIRST_MS << (attempt < 6 ? attempt : 6);
    if (cap > BACKOFF_MAX_MS) cap = BACKOFF_MAX_MS;
    return cap / 2 + next_random(c) % (cap / 2 + 1);
}

/* Start the reader of the link just opened, with its own reference to c. */
static int start_reader(conn *c)
{
    reader_args *r = malloc(sizeof *r);
    if (!r) return 0;
    *r = (reader_args){c, c->ws, c->link_id};
    conn_retain(c);
    c->reader = start_thread(reader_main, r);
    if (c->reader) return 1;
    conn_release(c); /* never the last reference: the I/O thread holds one */
    free(r);
    return 0;
}

static void run(conn *c)
{
    unsigned attempt = 0;
    while (!stop_requested(c)) {
        set_state(c, MT5HUB_STATE_CONNECTING);
        int link = open_link(c);
        if (link == LINK_UP) {
            ULONGLONG up_since = GetTickCount64();
            AcquireSRWLockExclusive(&c->lock);
            c->link_dead = c->reader_done = c->closing = c->pong_owed = 0;
            c->last_rx = up_since;
            c->state = MT5HUB_STATE_CONNECTED;
            c->stats[MT5HUB_STAT_CONNECTS]++;
            c->stats[MT5HUB_STAT_RETRY_MS] = 0;
            store_mark_all_dirty(&c->tables); /* the hub may have restarted: give it everything */
            ReleaseSRWLockExclusive(&c->lock);

            if (start_reader(c)) {
                pump(c);
                close_link(c);
                learn_frame_limit(c);
            } else {
                set_winhttp_error(c, L"no reader thread for", GetLastError());
                WinHttpCloseHandle(c->ws);
                WinHttpCloseHandle(c->connection);
                c->ws = c->connection = NULL;
            }
            if (GetTickCount64() - up_since >= STABLE_LINK_MS) attempt = 0;
        }
        if (stop_requested(c)) break;
        DWORD delay = backoff_ms(c, attempt++);
        AcquireSRWLockExclusive(&c->lock);
        c->state = link == LINK_REJECTED ? MT5HUB_STATE_REJECTED : MT5HUB_STATE_WAITING;
        c->stats[MT5HUB_STAT_RETRY_MS] = delay;
        ReleaseSRWLockExclusive(&c->lock);
        if (wait_for_stop(c, delay)) break;
    }
}

DWORD WINAPI io_main(void *arg)
{
    conn *c = arg;
    c->session = WinHttpOpen(USER_AGENT, WINHTTP_ACCESS_TYPE_DEFAULT_PROXY, WINHTTP_NO_PROXY_NAME,
                             WINHTTP_NO_PROXY_BYPASS, 0);
    if (c->session) {
        WinHttpSetTimeouts(c->session, CONNECT_TIMEOUT_MS, CONNECT_TIMEOUT_MS, CONNECT_TIMEOUT_MS,
                           RECEIVE_TIMEOUT_MS);
        /* HTTP/1.1 only: a WebSocket upgrade needs it, and Windows 10+ may otherwise offer h2
         * (ALPN) to a hub that speaks it. 0 enables no later protocol; a WinHTTP that does not
         * know the option (older Windows, Wine) speaks nothing but HTTP/1.1 anyway. */
        DWORD http1_only = 0;
        WinHttpSetOption(c->session, WINHTTP_OPTION_ENABLE_HTTP_PROTOCOL, &http1_only,
                         sizeof http1_only);
        run(c);
        WinHttpCloseHandle(c->session);
        c->session = NULL;
    } else {
        set_winhttp_error(c, L"WinHttpOpen failed for", GetLastError());
        set_state(c, MT5HUB_STATE_WAITING);
        wait_for_stop(c, INFINITE);
    }
    /* A handle whose lease ran out keeps its slot until an Open or Close reaps it: not its
     * tables (up to MT5HUB_MAX_BYTES), which nobody can send any more. */
    AcquireSRWLockExclusive(&c->lock);
    if (c->expired) store_free(&c->tables);
    ReleaseSRWLockExclusive(&c->lock);
    conn_release(c);
    thread_exit();
}
