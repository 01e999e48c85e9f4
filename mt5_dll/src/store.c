/* store.c: see store.h. Tables are few (at most MT5HUB_MAX_TABLES) and EAs publish a few times a
 * second, so plain arrays and linear scans are fast enough and easy to check. */
#include "store.h"

#include <stdlib.h>
#include <string.h>

#include "mt5hub.h"

blob *blob_new(const char *data, size_t len)
{
    blob *b = malloc(sizeof *b + len);
    if (!b) return NULL;
    b->refs = 1;
    b->len = len;
    memcpy(b->data, data, len);
    return b;
}

void blob_release(blob *b)
{
    if (b && InterlockedDecrement(&b->refs) == 0) free(b);
}

static size_t entry_bytes(const char *key, const char *src, const blob *state)
{
    return strlen(key) + strlen(src) + state->len;
}

int store_put(store *s, const char *key, const char *src, blob *state)
{
    for (int i = 0; i < s->count; i++) {
        table_entry *t = &s->tables[i];
        if (strcmp(t->key, key) != 0 || strcmp(t->src, src) != 0) continue;
        size_t bytes = s->bytes - t->state->len + state->len;
        if (bytes > MT5HUB_MAX_BYTES) return MT5HUB_E_FULL;
        int coalesced = t->dirty_since != 0;
        blob_release(t->state);
        t->state = state;
        s->bytes = bytes;
        if (!coalesced) { /* keeps its place in line if it was already waiting */
            t->dirty_since = ++s->next_order;
            s->dirty++;
        }
        return coalesced ? MT5HUB_COALESCED : MT5HUB_QUEUED;
    }

    if (s->count == MT5HUB_MAX_TABLES || s->bytes + entry_bytes(key, src, state) > MT5HUB_MAX_BYTES)
        return MT5HUB_E_FULL;
    if (s->count == s->capacity) {
        int capacity = s->capacity ? s->capacity * 2 : 8;
        table_entry *grown = realloc(s->tables, (size_t)capacity * sizeof *grown);
        if (!grown) return MT5HUB_E_SYSTEM;
        s->tables = grown;
        s->capacity = capacity;
    }
    char *k = _strdup(key), *r = _strdup(src);
    if (!k || !r) {
        free(k);
        free(r);
        return MT5HUB_E_SYSTEM;
    }
    s->tables[s->count++] = (table_entry){k, r, state, ++s->next_order, 0};
    s->bytes += entry_bytes(key, src, state);
    s->dirty++;
    return MT5HUB_QUEUED;
}

blob *store_take(store *s, unsigned long long now)
{
    table_entry *oldest = NULL;
    for (int i = 0; i < s->count; i++) {
        table_entry *t = &s->tables[i];
        if (t->dirty_since && (!oldest || t->dirty_since < oldest->dirty_since)) oldest = t;
    }
    if (!oldest) return NULL;
    oldest->dirty_since = 0;
    oldest->sent_at = now;
    s->dirty--;
    InterlockedIncrement(&oldest->state->refs);
    return oldest->state;
}

int store_drop_larger(store *s, size_t max_len)
{
    int dropped = 0;
    for (int i = 0; i < s->count;) {
        table_entry *t = &s->tables[i];
        if (t->state->len <= max_len) {
            i++;
            continue;
        }
        s->bytes -= entry_bytes(t->key, t->src, t->state);
        if (t->dirty_since) s->dirty--;
        free(t->key);
        free(t->src);
        blob_release(t->state);
        *t = s->tables[--s->count]; /* order lives in dirty_since, not in the array */
        dropped++;
    }
    return dropped;
}

int store_mark_sent_since(store *s, unsigned long long since)
{
    int marked = 0;
    for (int i = 0; i < s->count; i++) {
        table_entry *t = &s->tables[i];
        if (!t->dirty_since && t->sent_at && t->sent_at >= since) {
            t->dirty_since = ++s->next_order;
            s->dirty++;
            marked++;
        }
    }
    return marked;
}

void store_mark_all_dirty(store *s)
{
    for (int i = 0; i < s->count; i++) {
        if (!s->tables[i].dirty_since) {
            s->tables[i].dirty_since = ++s->next_order;
            s->dirty++;
        }
    }
}

void store_free(store *s)
{
    for (int i = 0; i < s->count; i++) {
        free(s->tables[i].key);
        free(s->tables[i].src);
        blob_release(s->tables[i].state);
    }
    free(s->tables);
    memset(s, 0, sizeof *s);
}
