/*
 * json.h: a strict JSON (RFC 8259) checker that also picks top-level string members.
 *
 * The DLL never builds or rewrites JSON; it only needs to know that a publish is well-formed (so an
 * EA bug is reported by Mt5HubSend instead of by the hub later), which table it belongs to
 * ("key", "src"), and what the hub says ("type", "code", "detail").
 */
#ifndef MT5HUB_JSON_H
#define MT5HUB_JSON_H

#include <stddef.h>

typedef struct json_field {
    const char *name; /* member to look for at the top level */
    char *value;      /* out: its string value, unescaped, NUL-terminated UTF-8 (malloc'd), or
                         NULL if absent or not a string. The last duplicate wins, as in Python. */
} json_field;

/* Returns 1 if text[0..len) is exactly one JSON object (finite numbers only, nesting depth at most
 * 64), else 0. On 1 the fields are filled in; free them with json_free_fields either way. */
int json_scan_object(const char *text, size_t len, json_field *fields, int nfields);

void json_free_fields(json_field *fields, int nfields);

#endif
