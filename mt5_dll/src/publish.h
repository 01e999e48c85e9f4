/*
 * publish.h: the hub's rules for a publish, checked before a table is queued.
 *
 * A state the hub refuses would be kept and sent again after every reconnect, and the EA would
 * learn of it only from an error frame later. The rules are the list in docs/protocol.md
 * ("Publisher to hub"), the same the hub applies (mt5hub/models.py), except the row count
 * (`max_rows` is the hub's setting: it stays the hub's to check).
 */
#ifndef MT5HUB_PUBLISH_H
#define MT5HUB_PUBLISH_H

#include <stddef.h>

#include "json.h"

#define PUBLISH_WHY_CAP 256

/* Check utf8[0..len). Returns 0 with *doc filled (free it with json_free; key and src are in
 * it), or MT5HUB_E_JSON (not a JSON object), MT5HUB_E_NOT_TABLE (no string "key" and "src") or
 * MT5HUB_E_INVALID with the broken rule in why ("$.data[0].sum: expected a finite number"). */
int publish_check(const char *utf8, size_t len, json_value *doc, char *why);

#endif
