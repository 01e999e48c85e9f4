/*
 * store.h: the latest state of every table a handle publishes, and which of them still need
 * sending ("dirty").
 *
 * This is the DLL's send queue. Sending a table again replaces its unsent state in place
 * (coalescing), so a long outage costs one state per table, never a backlog; MT5HUB_MAX_TABLES and
 * MT5HUB_MAX_BYTES bound it. States stay after they are sent so that a reconnect can re-send them
 * all: a restarted hub gets every table back at once instead of at each EA's next timer tick.
 *
 * Not thread-safe: the connection's lock guards it.
 */
#ifndef MT5HUB_STORE_H
#define MT5HUB_STORE_H

#include <stddef.h>
#include <windows.h>

/* A UTF-8 JSON payload shared by the store and the sender (which may still be writing it to the
 * socket when the EA replaces it). */
typedef struct blob {
    volatile LONG refs;
    size_t len;
    char data[];
} blob;

blob *blob_new(const char *data, size_t len); /* refs = 1 */
void blob_release(blob *b);

typedef struct table_entry {
    char *key;
    char *src;
    blob *state;
    unsigned long long dirty_since; /* 0: sent; else the order in which it became dirty */
    unsigned long long sent_at;     /* when its state was last taken for sending (a tick) */
} table_entry;

typedef struct store {
    table_entry *tables;
    int count;
    int capacity;
    size_t bytes;
    int dirty;
    unsigned long long next_order;
} store;

/* Make `state` the latest state of table (key, src), taking over the caller's reference. Returns
 * MT5HUB_QUEUED, MT5HUB_COALESCED, MT5HUB_E_FULL or MT5HUB_E_SYSTEM (then the caller still owns
 * `state`). */
int store_put(store *s, const char *key, const char *src, blob *state);

/* The dirty table that has waited longest, marked sent at tick `now`, with a reference for the
 * caller; NULL if none is dirty. */
blob *store_take(store *s, unsigned long long now);

/* Mark dirty again every clean table sent at tick `since` or later (frames the hub may have
 * dropped); returns how many. */
int store_mark_sent_since(store *s, unsigned long long since);

/* Forget the tables whose state is over max_len bytes; returns how many. */
int store_drop_larger(store *s, size_t max_len);

/* Mark every table dirty again, e.g. after a reconnect. */
void store_mark_all_dirty(store *s);

void store_free(store *s);

#endif
