/* publish.c: see publish.h. Each check names the JSON path it refuses, as the hub's error
 * frames do. */
#include "publish.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "mt5hub.h"

#define MAX_CELLS 32
#define COLOR_FIELD "cell_color"

static int refuse(char *why, const char *fmt, ...)
{
    va_list args;
    va_start(args, fmt);
    vsnprintf(why, PUBLISH_WHY_CAP, fmt, args);
    va_end(args);
    return MT5HUB_E_INVALID;
}

/* Characters (code points) of valid UTF-8, as the hub's len() counts them. */
static size_t characters(const json_value *s)
{
    size_t n = 0;
    for (size_t i = 0; i < s->len; i++) n += ((unsigned char)s->str[i] & 0xC0) != 0x80;
    return n;
}

/* C0, DEL and C1 (U+0080..U+009F, in UTF-8 C2 80..C2 9F): what the hub calls control
 * characters. */
static int has_control(const json_value *s)
{
    const unsigned char *p = (const unsigned char *)s->str;
    for (size_t i = 0; i < s->len; i++) {
        if (p[i] < 0x20 || p[i] == 0x7F) return 1;
        if (p[i] == 0xC2 && i + 1 < s->len && p[i + 1] >= 0x80 && p[i + 1] <= 0x9F) return 1;
    }
    return 0;
}

/* A name shown to people: a string of 1..max characters without control characters. */
static int check_name(const json_value *v, const char *path, size_t max, char *why)
{
    if (!v) return refuse(why, "%s: required field missing", path);
    if (v->type != JSON_STRING) return refuse(why, "%s: expected a string", path);
    size_t n = characters(v);
    if (n < 1 || n > max) return refuse(why, "%s: must be 1 to %u characters", path, (unsigned)max);
    if (has_control(v)) return refuse(why, "%s: must not hold control characters", path);
    return 0;
}

static int check_color(const json_value *v, const char *path, char *why)
{
    if (!v) return refuse(why, "%s: required field missing", path);
    if (v->type != JSON_STRING) return refuse(why, "%s: expected a string", path);
    if (characters(v) > 64 || has_control(v))
        return refuse(why, "%s: must be at most 64 characters, no control characters", path);
    return 0;
}

static int check_number(const json_value *v, const char *path, char *why)
{
    if (!v) return refuse(why, "%s: required field missing", path);
    if (v->type != JSON_NUMBER) return refuse(why, "%s: expected a finite number", path);
    return 0;
}

static int is_tf_name(const json_value *name)
{
    if (name->len < 1 || name->len > 16) return 0;
    for (size_t i = 0; i < name->len; i++) {
        char c = name->str[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '_'))
            return 0;
    }
    return 1;
}

/* {"H1": 0.4, "cell_color": "clrGreen"}: cell_color and exactly one timeframe (a name given
 * twice counts once, its last value wins, as in the hub's dict). */
static int check_cell(const json_value *cell, const char *path, char *why)
{
    char sub[160];
    if (cell->type != JSON_OBJECT) return refuse(why, "%s: expected an object", path);
    const json_value *tf = NULL;
    for (size_t i = 0; i < cell->len; i++) {
        const json_value *name = &cell->items[2 * i];
        if (!strcmp(name->str, COLOR_FIELD) && name->len == strlen(COLOR_FIELD)) continue;
        if (tf && (tf->len != name->len || memcmp(tf->str, name->str, name->len)))
            return refuse(why, "%s: expected exactly one timeframe field besides " COLOR_FIELD,
                          path);
        tf = name;
    }
    if (!tf)
        return refuse(why, "%s: expected exactly one timeframe field besides " COLOR_FIELD, path);
    if (!is_tf_name(tf))
        return refuse(why, "%s: timeframe name '%.40s' is not 1 to 16 of A-Z a-z 0-9 _", path,
                      tf->str);
    const json_value *color = json_get(cell, COLOR_FIELD);
    if (!color) return refuse(why, "%s: missing " COLOR_FIELD, path);
    snprintf(sub, sizeof sub, "%s.%s", path, tf->str);
    int rc = check_number(json_get(cell, tf->str), sub, why);
    if (rc) return rc;
    snprintf(sub, sizeof sub, "%s." COLOR_FIELD, path);
    return check_color(color, sub, why);
}

static int check_row(const json_value *row, const char *path, char *why)
{
    char sub[160];
    if (row->type != JSON_OBJECT) return refuse(why, "%s: expected an object", path);
    snprintf(sub, sizeof sub, "%s.pair", path);
    int rc = check_name(json_get(row, "pair"), sub, 64, why);
    if (rc) return rc;
    const json_value *cells = json_get(row, "TF_data");
    snprintf(sub, sizeof sub, "%s.TF_data", path);
    if (!cells) return refuse(why, "%s: required field missing", sub);
    if (cells->type != JSON_ARRAY) return refuse(why, "%s: expected a list", sub);
    if (cells->len > MAX_CELLS)
        return refuse(why, "%s: at most %d timeframe cells, got %u", sub, MAX_CELLS,
                      (unsigned)cells->len);
    for (size_t i = 0; i < cells->len; i++) {
        snprintf(sub, sizeof sub, "%s.TF_data[%u]", path, (unsigned)i);
        if ((rc = check_cell(&cells->items[i], sub, why))) return rc;
    }
    snprintf(sub, sizeof sub, "%s.sum", path);
    if ((rc = check_number(json_get(row, "sum"), sub, why))) return rc;
    snprintf(sub, sizeof sub, "%s.sum_cell_color", path);
    return check_color(json_get(row, "sum_cell_color"), sub, why);
}

/* The first top-level name given twice, or NULL. Publishes have a handful of members. */
static const json_value *repeated_name(const json_value *obj)
{
    for (size_t i = 1; i < obj->len; i++) {
        const json_value *name = &obj->items[2 * i];
        for (size_t j = 0; j < i; j++) {
            const json_value *seen = &obj->items[2 * j];
            if (seen->len == name->len && !memcmp(seen->str, name->str, name->len)) return name;
        }
    }
    return NULL;
}

int publish_check(const char *utf8, size_t len, json_value *doc, char *why)
{
    json_parse_result info;
    *why = '\0';
    if (!json_parse(utf8, len, doc, &info)) return MT5HUB_E_JSON;
    int rc = 0;
    const json_value *twice = NULL, *type = NULL, *data = NULL;
    if (doc->type != JSON_OBJECT) {
        rc = MT5HUB_E_JSON;
    } else if (info.lone_surrogate) {
        rc = refuse(why, "a string holds a lone UTF-16 surrogate (\\ud800-\\udfff without its pair)");
    } else if ((twice = repeated_name(doc))) {
        rc = refuse(why, "$.%.40s: given more than once", twice->str);
    } else if (!json_string(json_get(doc, "key")) || !json_string(json_get(doc, "src"))) {
        rc = MT5HUB_E_NOT_TABLE;
    } else if ((type = json_get(doc, "type")) && !(json_string(type) &&
                                                   !strcmp(type->str, "publish"))) {
        rc = refuse(why, "$.type: a publish has no type or \"publish\"");
    } else if ((rc = check_name(json_get(doc, "key"), "$.key", 128, why)) ||
               (rc = check_name(json_get(doc, "src"), "$.src", 128, why)) ||
               (rc = check_name(json_get(doc, "clientId"), "$.clientId", 128, why))) {
        /* rc and why are set */
    } else if (!(data = json_get(doc, "data"))) {
        rc = refuse(why, "$.data: required field missing");
    } else if (data->type != JSON_ARRAY) {
        rc = refuse(why, "$.data: expected a list");
    } else {
        for (size_t i = 0; i < data->len && !rc; i++) {
            char path[32];
            snprintf(path, sizeof path, "$.data[%u]", (unsigned)i);
            rc = check_row(&data->items[i], path, why);
        }
    }
    if (rc) json_free(doc);
    return rc;
}
