/*
 * dlltest.exe: drives mt5hub.dll the way an EA does (LoadLibrary, UTF-16 strings, polling) for
 * tests/test_dll_wine.py, which runs it under Wine and talks to it over stdin/stdout.
 *
 * One command per line in, exactly one answer line out: "ok <values...>" or "bad <why>" for a
 * malformed command. Text is UTF-8 on the pipes and UTF-16 at the DLL, like MQL5 strings.
 *
 *   version                      ok <Mt5HubVersion()>
 *   open <url> <token|-> <flags> ok <handle or error>         (- passes a NULL token)
 *   openpin <url> <token|-> <fingerprint...>   Mt5HubOpenPinned: ok <handle or error>
 *   send <h> <json...>           ok <result> <microseconds the call took>
 *   sendmany <h> <n> <json...>   n sends, "$i" in json replaced by 1..n:
 *                                ok <last result> <slowest call us> <all calls us>
 *   sendhex <h> <hex>            send raw UTF-16 code units, 4 hex digits each: ok <result>
 *   status <h>                   ok <state> <queued>
 *   error <h> [size]             ok <full length> <text, truncated to size-1 chars>
 *   stat <h> <which>             ok <value>
 *   close <h>                    ok <result> <microseconds>
 *   lease <h> <seconds>          ok <Mt5HubSetLease result>
 *   errtext <code>               ok <the DLL's text for a Windows/WinHTTP error code>
 *   threads                      ok <Mt5HubThreads()>
 *   unload                       FreeLibrary: ok unloaded | ok still-loaded
 *   load                         LoadLibrary again: ok | bad <error>
 *   quit
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <windows.h>

#include "mt5hub.h"
#include "text.h"

typedef int(__cdecl *open_fn)(const wchar_t *, const wchar_t *, int);
typedef int(__cdecl *send_fn)(int, const wchar_t *);
typedef int(__cdecl *status_fn)(int, int *);
typedef int(__cdecl *last_error_fn)(int, wchar_t *, int);
typedef long long(__cdecl *stat_fn)(int, int);
typedef int(__cdecl *close_fn)(int);
typedef int(__cdecl *void_fn)(void);

static HMODULE dll;
static wchar_t dll_path[MAX_PATH];
static open_fn p_open;
static send_fn p_send;
static status_fn p_status;
static last_error_fn p_last_error;
static stat_fn p_stat;
static close_fn p_close;
static void_fn p_threads, p_version;
static int(__cdecl *p_lease)(int, int);
static int(__cdecl *p_open_pinned)(const wchar_t *, const wchar_t *, const wchar_t *);

/* Returns 0 so that handlers can `return reply(...)`. */
static int reply(const char *fmt, ...)
{
    char line[8192];
    va_list args;
    va_start(args, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, args);
    va_end(args);
    if (n < 0 || n > (int)sizeof line - 2) n = (int)sizeof line - 2;
    line[n++] = '\n';
    DWORD written;
    WriteFile(GetStdHandle(STD_OUTPUT_HANDLE), line, (DWORD)n, &written, NULL);
    return 0;
}

static int load(void)
{
    dll = LoadLibraryW(dll_path);
    if (!dll) return 0;
    p_open = (open_fn)(void *)GetProcAddress(dll, "Mt5HubOpen");
    p_send = (send_fn)(void *)GetProcAddress(dll, "Mt5HubSend");
    p_status = (status_fn)(void *)GetProcAddress(dll, "Mt5HubStatus");
    p_last_error = (last_error_fn)(void *)GetProcAddress(dll, "Mt5HubLastError");
    p_stat = (stat_fn)(void *)GetProcAddress(dll, "Mt5HubStat");
    p_close = (close_fn)(void *)GetProcAddress(dll, "Mt5HubClose");
    p_threads = (void_fn)(void *)GetProcAddress(dll, "Mt5HubThreads");
    p_version = (void_fn)(void *)GetProcAddress(dll, "Mt5HubVersion");
    p_lease = (int(__cdecl *)(int, int))(void *)GetProcAddress(dll, "Mt5HubSetLease");
    p_open_pinned = (int(__cdecl *)(const wchar_t *, const wchar_t *, const wchar_t *))(void *)
        GetProcAddress(dll, "Mt5HubOpenPinned");
    return p_open && p_send && p_status && p_last_error && p_stat && p_close && p_threads &&
           p_version && p_lease && p_open_pinned;
}

static wchar_t *widen(const char *s)
{
    int n = MultiByteToWideChar(CP_UTF8, 0, s, -1, NULL, 0);
    wchar_t *w = malloc((size_t)n * sizeof *w);
    MultiByteToWideChar(CP_UTF8, 0, s, -1, w, n);
    return w;
}

static double now_us(void)
{
    static LARGE_INTEGER freq;
    LARGE_INTEGER t;
    if (!freq.QuadPart) QueryPerformanceFrequency(&freq);
    QueryPerformanceCounter(&t);
    return (double)t.QuadPart * 1e6 / (double)freq.QuadPart;
}

/* Split off the next space-separated word; *rest points after it (the remainder of the line). */
static char *word(char **rest)
{
    char *s = *rest;
    while (*s == ' ') s++;
    if (!*s) return NULL;
    char *end = strchr(s, ' ');
    if (end) {
        *end = '\0';
        *rest = end + 1;
    } else {
        *rest = s + strlen(s);
    }
    return s;
}

/* json with every "$i" replaced by i. */
static char *substitute(const char *json, int i)
{
    char num[16];
    int numlen = snprintf(num, sizeof num, "%d", i);
    size_t count = 0;
    for (const char *p = json; (p = strstr(p, "$i")); p += 2) count++;
    char *out = malloc(strlen(json) + count * (size_t)numlen + 1), *o = out;
    for (const char *p = json; *p;) {
        if (p[0] == '$' && p[1] == 'i') {
            memcpy(o, num, (size_t)numlen);
            o += numlen;
            p += 2;
        } else {
            *o++ = *p++;
        }
    }
    *o = '\0';
    return out;
}

static int run(char *line)
{
    char *rest = line, *cmd = word(&rest);
    if (!cmd) return reply("bad empty line");
    if (!strcmp(cmd, "load")) {
        if (load()) return reply("ok");
        return reply("bad LoadLibrary error %lu", GetLastError());
    }
    if (!dll) return reply("bad DLL not loaded");

    if (!strcmp(cmd, "version")) return reply("ok %d", p_version());
    if (!strcmp(cmd, "threads")) return reply("ok %d", p_threads());
    if (!strcmp(cmd, "errtext")) {
        char *code = word(&rest), text[1024];
        wchar_t wide[512];
        if (!code) return reply("bad usage: errtext <code>");
        describe_error((DWORD)strtoul(code, NULL, 10), wide, 512);
        WideCharToMultiByte(CP_UTF8, 0, wide, -1, text, sizeof text, NULL, NULL);
        return reply("ok %s", text);
    }
    if (!strcmp(cmd, "unload")) {
        FreeLibrary(dll);
        dll = NULL;
        /* The DLL leaves the process once no thread of it holds it: a thread that has just
         * left Mt5HubThreads() may still be finishing its exit, so give it a moment. */
        for (int i = 0; i < 500 && GetModuleHandleW(L"mt5hub.dll"); i++) Sleep(10);
        return reply("ok %s", GetModuleHandleW(L"mt5hub.dll") ? "still-loaded" : "unloaded");
    }
    if (!strcmp(cmd, "openpin")) {
        char *url = word(&rest), *token = word(&rest);
        if (!token) return reply("bad usage: openpin <url> <token|-> <fingerprint>");
        wchar_t *wurl = widen(url), *wtoken = strcmp(token, "-") ? widen(token) : NULL;
        wchar_t *wpin = widen(rest);
        int h = p_open_pinned(wurl, wtoken, wpin);
        free(wurl);
        free(wtoken);
        free(wpin);
        return reply("ok %d", h);
    }
    if (!strcmp(cmd, "open")) {
        char *url = word(&rest), *token = word(&rest), *flags = word(&rest);
        if (!flags) return reply("bad usage: open <url> <token|-> <flags>");
        wchar_t *wurl = widen(url), *wtoken = strcmp(token, "-") ? widen(token) : NULL;
        int h = p_open(wurl, wtoken, atoi(flags));
        free(wurl);
        free(wtoken);
        return reply("ok %d", h);
    }

    char *handle_word = word(&rest);
    if (!handle_word) return reply("bad missing handle");
    int h = atoi(handle_word);
    if (!strcmp(cmd, "send")) {
        wchar_t *json = widen(rest);
        double t0 = now_us();
        int rc = p_send(h, json);
        double took = now_us() - t0;
        free(json);
        return reply("ok %d %.0f", rc, took);
    }
    if (!strcmp(cmd, "sendmany")) {
        char *count = word(&rest);
        if (!count) return reply("bad usage: sendmany <h> <n> <json>");
        int n = atoi(count), rc = 0;
        double slowest = 0, total = 0;
        for (int i = 1; i <= n && rc >= 0; i++) {
            char *text = substitute(rest, i);
            wchar_t *json = widen(text);
            double t0 = now_us();
            rc = p_send(h, json);
            double took = now_us() - t0;
            total += took;
            if (took > slowest) slowest = took;
            free(json);
            free(text);
        }
        return reply("ok %d %.0f %.0f", rc, slowest, total);
    }
    if (!strcmp(cmd, "sendhex")) {
        size_t n = strlen(rest) / 4;
        wchar_t *text = calloc(n + 1, sizeof *text);
        for (size_t i = 0; i < n; i++) {
            char unit[5] = {rest[4 * i], rest[4 * i + 1], rest[4 * i + 2], rest[4 * i + 3], 0};
            text[i] = (wchar_t)strtoul(unit, NULL, 16);
        }
        int rc = p_send(h, text);
        free(text);
        return reply("ok %d", rc);
    }
    if (!strcmp(cmd, "status")) {
        int queued = -1;
        int state = p_status(h, &queued);
        return reply("ok %d %d", state, queued);
    }
    if (!strcmp(cmd, "error")) {
        char *size_word = word(&rest);
        int size = size_word ? atoi(size_word) : 1024;
        wchar_t *buf = calloc((size_t)size + 1, sizeof *buf);
        int len = p_last_error(h, buf, size);
        char text[4096] = "";
        WideCharToMultiByte(CP_UTF8, 0, buf, -1, text, sizeof text, NULL, NULL);
        free(buf);
        return reply("ok %d %s", len, text);
    }
    if (!strcmp(cmd, "stat")) {
        char *which = word(&rest);
        if (!which) return reply("bad usage: stat <h> <which>");
        return reply("ok %lld", p_stat(h, atoi(which)));
    }
    if (!strcmp(cmd, "lease")) {
        char *seconds = word(&rest);
        if (!seconds) return reply("bad usage: lease <h> <seconds>");
        return reply("ok %d", p_lease(h, atoi(seconds)));
    }
    if (!strcmp(cmd, "close")) {
        double t0 = now_us();
        int rc = p_close(h);
        return reply("ok %d %.0f", rc, now_us() - t0);
    }
    return reply("bad unknown command %s", cmd);
}

int main(int argc, char **argv)
{
    /* The DLL sits next to this program unless a path is given. */
    if (argc > 1) {
        MultiByteToWideChar(CP_UTF8, 0, argv[1], -1, dll_path, MAX_PATH);
    } else {
        GetModuleFileNameW(NULL, dll_path, MAX_PATH);
        wchar_t *slash = wcsrchr(dll_path, L'\\');
        wcscpy(slash ? slash + 1 : dll_path, L"mt5hub.dll");
    }
    if (!load()) {
        reply("bad cannot load mt5hub.dll: error %lu", GetLastError());
        return 1;
    }
    reply("ready");

    HANDLE in = GetStdHandle(STD_INPUT_HANDLE);
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    for (;;) {
        char *nl;
        while (!(nl = memchr(buf, '\n', len))) {
            if (len == cap) buf = realloc(buf, cap *= 2);
            DWORD got = 0;
            if (!ReadFile(in, buf + len, (DWORD)(cap - len), &got, NULL) || got == 0) return 0;
            len += got;
        }
        *nl = '\0';
        if (nl > buf && nl[-1] == '\r') nl[-1] = '\0';
        if (!strcmp(buf, "quit")) return 0;
        run(buf);
        len -= (size_t)(nl + 1 - buf);
        memmove(buf, nl + 1, len);
    }
}
