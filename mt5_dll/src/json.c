/* json.c: see json.h. A recursive-descent checker over a byte range; no allocation except for the
 * values of the requested fields. */
#include "json.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 64

typedef struct scanner {
    const char *p;
    const char *end;
    int depth;
} scanner;

static int parse_value(scanner *s);

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

/* Checks a string starting at the opening quote. If `decoded` is not NULL, stores the unescaped
 * value there (malloc'd; escapes never expand, so the raw length is enough room). */
static int parse_string(scanner *s, char **decoded)
{
    const char *start = ++s->p; /* past the quote */
    char *out = NULL;
    size_t n = 0;
    if (decoded) {
        /* Worst case is the raw length: every escape decodes to no more bytes than it spans. */
        const char *q = start;
        while (q < s->end && *q != '"') q += (*q == '\\' && q + 1 < s->end) ? 2 : 1;
        out = malloc((size_t)(q - start) + 1);
        if (!out) return 0;
    }
    while (s->p < s->end) {
        unsigned char c = (unsigned char)*s->p;
        if (c == '"') {
            s->p++;
            if (decoded) {
                out[n] = '\0';
                free(*decoded); /* a duplicate member: the last one wins */
                *decoded = out;
            }
            return 1;
        }
        if (c < 0x20) break; /* control characters must be escaped */
        if (c != '\\') {
            if (out) out[n++] = (char)c;
            s->p++;
            continue;
        }
        if (s->end - s->p < 2) break;
        char e = s->p[1];
        s->p += 2;
        const char *simple = strchr("\"\\/bfnrt", e);
        if (e && simple) {
            if (out) out[n++] = "\"\\/\b\f\n\r\t"[simple - "\"\\/bfnrt"];
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
        if (cp >= 0xD800 && cp <= 0xDFFF) cp = 0xFFFD; /* a lone surrogate: valid JSON, not UTF-8 */
        if (out) n += put_utf8(out + n, cp);
    }
    free(out);
    return 0;
}

static int parse_number(scanner *s)
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
    int finite = isfinite(strtod(copy, NULL));
    if (copy != local) free(copy);
    return finite;
}

static int parse_literal(scanner *s, const char *word)
{
    size_t n = strlen(word);
    if ((size_t)(s->end - s->p) < n || memcmp(s->p, word, n) != 0) return 0;
    s->p += n;
    return 1;
}

/* An object's members; at depth 1 (the top level) the requested fields are captured. */
static int parse_object(scanner *s, json_field *fields, int nfields)
{
    s->p++; /* '{' */
    skip_ws(s);
    if (s->p < s->end && *s->p == '}') {
        s->p++;
        return 1;
    }
    for (;;) {
        skip_ws(s);
        if (s->p >= s->end || *s->p != '"') return 0;
        const char *name = s->p + 1;
        if (!parse_string(s, NULL)) return 0;
        size_t name_len = (size_t)(s->p - 1 - name);
        skip_ws(s);
        if (s->p >= s->end || *s->p != ':') return 0;
        s->p++;
        skip_ws(s);
        json_field *wanted = NULL;
        for (int i = 0; i < nfields; i++)
            if (strlen(fields[i].name) == name_len && !memcmp(fields[i].name, name, name_len))
                wanted = &fields[i]; /* names we look for never contain escapes */
        if (wanted && s->p < s->end && *s->p == '"') {
            if (!parse_string(s, &wanted->value)) return 0;
        } else {
            if (wanted) { /* present but not a string: as if absent */
                free(wanted->value);
                wanted->value = NULL;
            }
            if (!parse_value(s)) return 0;
        }
        skip_ws(s);
        if (s->p >= s->end) return 0;
        if (*s->p == '}') {
            s->p++;
            return 1;
        }
        if (*s->p != ',') return 0;
        s->p++;
    }
}

static int parse_array(scanner *s)
{
    s->p++; /* '[' */
    skip_ws(s);
    if (s->p < s->end && *s->p == ']') {
        s->p++;
        return 1;
    }
    for (;;) {
        if (!parse_value(s)) return 0;
        skip_ws(s);
        if (s->p >= s->end) return 0;
        if (*s->p == ']') {
            s->p++;
            return 1;
        }
        if (*s->p != ',') return 0;
        s->p++;
    }
}

static int parse_value(scanner *s)
{
    skip_ws(s);
    if (s->p >= s->end) return 0;
    int ok;
    switch (*s->p) {
    case '{':
    case '[':
        if (++s->depth > MAX_DEPTH) return 0;
        ok = *s->p == '{' ? parse_object(s, NULL, 0) : parse_array(s);
        s->depth--;
        return ok;
    case '"':
        return parse_string(s, NULL);
    case 't':
        return parse_literal(s, "true");
    case 'f':
        return parse_literal(s, "false");
    case 'n':
        return parse_literal(s, "null");
    default:
        return parse_number(s);
    }
}

int json_scan_object(const char *text, size_t len, json_field *fields, int nfields)
{
    scanner s = {text, text + len, 1};
    for (int i = 0; i < nfields; i++) fields[i].value = NULL;
    skip_ws(&s);
    if (s.p >= s.end || *s.p != '{') return 0;
    if (!parse_object(&s, fields, nfields)) return 0;
    skip_ws(&s);
    return s.p == s.end;
}

void json_free_fields(json_field *fields, int nfields)
{
    for (int i = 0; i < nfields; i++) {
        free(fields[i].value);
        fields[i].value = NULL;
    }
}
