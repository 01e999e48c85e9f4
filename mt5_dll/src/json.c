/* json.c: see json.h. A recursive-descent parser over a byte range. Everything a tree holds comes
 * from one arena, freed at once: a 28 x 9 table is some 1,500 values, and a malloc per value
 * cost more than the parsing. A container's children are parsed onto a scratch stack and copied
 * into the arena once their number is known. */
#include "json.h"

#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 64

typedef struct block {
    struct block *next;
    size_t used, cap;
    max_align_t data[]; /* (aligned for json_value) */
} block;

typedef struct scanner {
    const char *p;
    const char *end;
    int depth;
    int lone_surrogate;
    block *arena;      /* newest block first */
    json_value *stack; /* children of the containers being parsed */
    size_t top, cap;
} scanner;

/* n bytes from the arena (aligned), or NULL. */
static void *arena_alloc(scanner *s, size_t n)
{
    n = (n + sizeof(max_align_t) - 1) / sizeof(max_align_t) * sizeof(max_align_t);
    block *b = s->arena;
    if (!b || b->cap - b->used < n) {
        size_t cap = n > 16384 ? n : 16384;
        b = malloc(sizeof *b + cap);
        if (!b) return NULL;
        b->next = s->arena, b->used = 0, b->cap = cap;
        s->arena = b;
    }
    void *p = (char *)b->data + b->used;
    b->used += n;
    return p;
}

static int push(scanner *s, const json_value *v)
{
    if (s->top == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 256;
        json_value *grown = realloc(s->stack, cap * sizeof *grown);
        if (!grown) return 0;
        s->stack = grown;
        s->cap = cap;
    }
    s->stack[s->top++] = *v;
    return 1;
}

/* Move the children pushed since `base` into out->items (in the arena). */
static int pop_into(scanner *s, size_t base, json_value *out)
{
    size_t n = s->top - base;
    out->items = n ? arena_alloc(s, n * sizeof *out->items) : NULL;
    if (n && !out->items) return 0;
    if (n) memcpy(out->items, s->stack + base, n * sizeof *out->items);
    s->top = base;
    out->len = n;
    return 1;
}

static int parse_value(scanner *s, json_value *out);

static void skip_ws(scanner *s)
{
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
        s->p++;
}

static int hex4(const char *p, unsigned *out)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (unsigned)(c - 'A' + 10);
        else
            return 0;
    }
    *out = v;
    return 1;
}

static size_t put_utf8(char *out, unsigned cp)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* A string starting at the opening quote, unescaped into out (escapes never expand, so the raw
 * length is enough room). */
static int parse_string(scanner *s, json_value *out)
{
    const char *start = ++s->p; /* past the quote */
    const char *q = start;
    while (q < s->end && *q != '"') q += (*q == '\\' && q + 1 < s->end) ? 2 : 1;
    char *buf = arena_alloc(s, (size_t)(q - start) + 1);
    size_t n = 0;
    if (!buf) return 0;
    while (s->p < s->end) {
        unsigned char c = (unsigned char)*s->p;
        if (c == '"') {
            s->p++;
            buf[n] = '\0';
            out->type = JSON_STRING;
            out->str = buf;
            out->len = n;
            return 1;
        }
        if (c < 0x20) break; /* control characters must be escaped */
        if (c != '\\') {
            buf[n++] = (char)c;
            s->p++;
            continue;
        }
        if (s->end - s->p < 2) break;
        char e = s->p[1];
        s->p += 2;
        const char *simple = strchr("\"\\/bfnrt", e);
        if (e && simple) {
            buf[n++] = "\"\\/\b\f\n\r\t"[simple - "\"\\/bfnrt"];
            continue;
        }
        if (e != 'u' || s->end - s->p < 4) break;
        unsigned cp;
        if (!hex4(s->p, &cp)) break;
        s->p += 4;
        if (cp >= 0xD800 && cp <= 0xDBFF && s->end - s->p >= 6 && s->p[0] == '\\' &&
            s->p[1] == 'u') {
            unsigned low;
            if (hex4(s->p + 2, &low) && low >= 0xDC00 && low <= 0xDFFF) {
                cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                s->p += 6;
            }
        }
        if (cp >= 0xD800 && cp <= 0xDFFF) {
            s->lone_surrogate = 1;
            cp = 0xFFFD;
        }
        n += put_utf8(buf + n, cp);
    }
    return 0;
}

static int parse_number(scanner *s, json_value *out)
{
    const char *start = s->p;
    if (s->p < s->end && *s->p == '-') s->p++;
    if (s->p >= s->end) return 0;
    if (*s->p == '0') {
        s->p++;
    } else if (*s->p >= '1' && *s->p <= '9') {
        while (s->p < s->end && *s->p >= '0' && *s->p <= '9') s->p++;
    } else {
        return 0;
    }
    if (s->p < s->end && *s->p == '.') {
        s->p++;
        if (s->p >= s->end || *s->p < '0' || *s->p > '9') return 0;
        while (s->p < s->end && *s->p >= '0' && *s->p <= '9') s->p++;
    }
    if (s->p < s->end && (*s->p == 'e' || *s->p == 'E')) {
        s->p++;
        if (s->p < s->end && (*s->p == '+' || *s->p == '-')) s->p++;
        if (s->p >= s->end || *s->p < '0' || *s->p > '9') return 0;
        while (s->p < s->end && *s->p >= '0' && *s->p <= '9') s->p++;
    }
    /* Grammar is fine; now the range: 1e999 parses as infinity, which the hub rejects. */
    size_t len = (size_t)(s->p - start);
    char local[64];
    char *copy = len < sizeof local ? local : malloc(len + 1);
    if (!copy) return 0;
    memcpy(copy, start, len);
    copy[len] = '\0';
    out->type = JSON_NUMBER;
    out->number = strtod(copy, NULL);
    if (copy != local) free(copy);
    return isfinite(out->number);
}

static int parse_literal(scanner *s, const char *word, json_type type, json_value *out)
{
    size_t n = strlen(word);
    if ((size_t)(s->end - s->p) < n || memcmp(s->p, word, n) != 0) return 0;
    s->p += n;
    out->type = type;
    return 1;
}

/* Members go into items as name, value pairs; len counts members. */
static int parse_object(scanner *s, json_value *out)
{
    size_t base = s->top;
    out->type = JSON_OBJECT;
    s->p++; /* '{' */
    skip_ws(s);
    if (s->p < s->end && *s->p == '}') {
        s->p++;
        return 1;
    }
    for (;;) {
        json_value v = {0};
        skip_ws(s);
        if (s->p >= s->end || *s->p != '"') return 0;
        if (!parse_string(s, &v) || !push(s, &v)) return 0;
        skip_ws(s);
        if (s->p >= s->end || *s->p != ':') return 0;
        s->p++;
        memset(&v, 0, sizeof v);
        if (!parse_value(s, &v) || !push(s, &v)) return 0;
        skip_ws(s);
        if (s->p >= s->end) return 0;
        if (*s->p == '}') {
            s->p++;
            if (!pop_into(s, base, out)) return 0;
            out->len /= 2;
            return 1;
        }
        if (*s->p != ',') return 0;
        s->p++;
    }
}

static int parse_array(scanner *s, json_value *out)
{
    size_t base = s->top;
    out->type = JSON_ARRAY;
    s->p++; /* '[' */
    skip_ws(s);
    if (s->p < s->end && *s->p == ']') {
        s->p++;
        return 1;
    }
    for (;;) {
        json_value v = {0};
        if (!parse_value(s, &v) || !push(s, &v)) return 0;
        skip_ws(s);
        if (s->p >= s->end) return 0;
        if (*s->p == ']') {
            s->p++;
            return pop_into(s, base, out);
        }
        if (*s->p != ',') return 0;
        s->p++;
    }
}

static int parse_value(scanner *s, json_value *out)
{
    skip_ws(s);
    if (s->p >= s->end) return 0;
    int ok;
    switch (*s->p) {
    case '{':
    case '[':
        if (++s->depth > MAX_DEPTH) return 0;
        ok = *s->p == '{' ? parse_object(s, out) : parse_array(s, out);
        s->depth--;
        return ok;
    case '"':
        return parse_string(s, out);
    case 't':
        return parse_literal(s, "true", JSON_TRUE, out);
    case 'f':
        return parse_literal(s, "false", JSON_FALSE, out);
    case 'n':
        return parse_literal(s, "null", JSON_NULL, out);
    default:
        return parse_number(s, out);
    }
}

static void free_arena(block *b)
{
    while (b) {
        block *next = b->next;
        free(b);
        b = next;
    }
}

int json_parse(const char *text, size_t len, json_value *out, json_parse_result *info)
{
    scanner s = {text, text + len, 0, 0, NULL, NULL, 0, 0};
    memset(out, 0, sizeof *out);
    int ok = parse_value(&s, out);
    if (ok) {
        skip_ws(&s);
        ok = s.p == s.end;
    }
    free(s.stack);
    if (!ok) {
        free_arena(s.arena);
        memset(out, 0, sizeof *out);
        return 0;
    }
    out->arena = s.arena;
    if (info) info->lone_surrogate = s.lone_surrogate;
    return 1;
}

void json_free(json_value *v)
{
    free_arena(v->arena);
    memset(v, 0, sizeof *v);
}

const json_value *json_get(const json_value *v, const char *name)
{
    if (!v || v->type != JSON_OBJECT) return NULL;
    size_t name_len = strlen(name);
    for (size_t i = v->len; i-- > 0;) {
        const json_value *n = &v->items[2 * i];
        if (n->len == name_len && !memcmp(n->str, name, name_len)) return &v->items[2 * i + 1];
    }
    return NULL;
}

const char *json_string(const json_value *v)
{
    return v && v->type == JSON_STRING ? v->str : NULL;
}
