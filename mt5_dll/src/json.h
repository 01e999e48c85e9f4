/*
 * json.h: a strict JSON (RFC 8259) parser into a small tree.
 *
 * The DLL never builds or rewrites JSON: it parses a publish to check it against the hub's rules
 * (publish.c) before it is queued, and the hub's frames to read "type", "code", "detail" and the
 * rate limit numbers.
 */
#ifndef MT5HUB_JSON_H
#define MT5HUB_JSON_H

#include <stddef.h>

typedef enum json_type {
    JSON_NULL,
    JSON_FALSE,
    JSON_TRUE,
    JSON_NUMBER,
    JSON_STRING,
    JSON_ARRAY,
    JSON_OBJECT
} json_type;

typedef struct json_value json_value;
struct json_value {
    json_type type;
    double number;     /* JSON_NUMBER: always finite */
    char *str;         /* JSON_STRING: unescaped UTF-8, NUL-terminated (may hold \u0000) */
    size_t len;        /* JSON_STRING: bytes; JSON_ARRAY: elements; JSON_OBJECT: members */
    json_value *items; /* JSON_ARRAY: the elements; JSON_OBJECT: name, value, name, value, ... */
    void *arena;       /* the tree's memory: set in the root only */
};

typedef struct json_parse_result {
    int lone_surrogate; /* some string escaped half of a surrogate pair (\ud800): valid JSON, but
                           no text; it was decoded as U+FFFD */
} json_parse_result;

/* Parse text[0..len) as exactly one JSON value (finite numbers only, nesting depth at most 64).
 * Returns 1 and fills *out (free it with json_free), or 0. */
int json_parse(const char *text, size_t len, json_value *out, json_parse_result *info);

/* Free a tree json_parse made (its root); a zeroed json_value is fine too. */
void json_free(json_value *v);

/* The value of member `name` of an object (the last one if given twice, as in Python), or NULL
 * if v is not an object or has no such member. */
const json_value *json_get(const json_value *v, const char *name);

/* Its string, or NULL if v is NULL or not a string. */
const char *json_string(const json_value *v);

#endif
