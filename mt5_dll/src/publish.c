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

/* Where a check is: $.data[row].TF_data[cell].field (row, cell < 0 and field NULL: absent). The
 * path is only written out for a refusal: a valid table costs no formatting. */
typedef struct where {
    int row, cell;
    const char *field;
} where;

static int refuse_at(char *why, where w, const char *fmt, ...)
{
    int n = snprintf(why, PUBLISH_WHY_CAP, "$");
    if (w.row >= 0) n += snprintf(why + n, PUBLISH_WHY_CAP - (size_t)n, ".data[%d]", w.row);
    if (w.cell >= 0) n += snprintf(why + n, PUBLISH_WHY_CAP - (size_t)n, ".TF_data[%d]", w.cell);
    if (w.field) n += snprintf(why + n, PUBLISH_WHY_CAP - (size_t)n, ".%.40s", w.field);
    n += snprintf(why + n, PUBLISH_WHY_CAP - (size_t)n, ": ");
    va_list args;
    va_start(args, fmt);
    vsnprintf(why + n, PUBLISH_WHY_CAP - (size_t)n, fmt, args);
    va_end(args);
    return MT5HUB_E_INVALID;
}

static where at(int row, int cell, const char *field)
{
    where w = {row, cell, field};
    return w;
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
static int check_name(const json_value *v, where w, size_t max, char *why)
{
    if (!v) return refuse_at(why, w, "required field missing");
    if (v->type != JSON_STRING) return refuse_at(why, w, "expected a string");
    size_t n = characters(v);
    if (n < 1 || n > max) return refuse_at(why, w, "must be 1 to %u characters", (unsigned)max);
    if (has_control(v)) return refuse_at(why, w, "must not hold control characters");
    return 0;
}

static int check_color(const json_value *v, where w, char *why)
{
    if (!v) return refuse_at(why, w, "required field missing");
    if (v->type != JSON_STRING) return refuse_at(why, w, "expected a string");
    if (characters(v) > 64 || has_control(v))
        return refuse_at(why, w, "must be at most 64 characters, no control characters");
    return 0;
}

static int check_number(const json_value *v, where w, char *why)
{
    if (!v) return refuse_at(why, w, "required field missing");
    if (v->type != JSON_NUMBER) return refuse_at(why, w, "expected a finite number");
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

static int is_color_field(const json_value *name)
{
    return name->len == sizeof COLOR_FIELD - 1 && !memcmp(name->str, COLOR_FIELD, name->len);
}

/* {"H1": 0.4, "cell_color": "clrGreen"}: cell_color and exactly one timeframe (a name given
 * twice counts once, its last value wins, as in the hub's dict). */
static int check_cell(const json_value *cell, int row, int i, char *why)
{
    where here = at(row, i, NULL);
    if (cell->type != JSON_OBJECT) return refuse_at(why, here, "expected an object");
    const json_value *tf = NULL, *value = NULL, *color = NULL;
    for (size_t m = 0; m < cell->len; m++) {
        const json_value *name = &cell->items[2 * m];
        if (is_color_field(name)) {
            color = &cell->items[2 * m + 1];
            continue;
        }
        if (tf && (tf->len != name->len || memcmp(tf->str, name->str, name->len)))
            return refuse_at(why, here,
                             "expected exactly one timeframe field besides " COLOR_FIELD);
        tf = name;
        value = &cell->items[2 * m + 1];
    }
    if (!tf)
        return refuse_at(why, here, "expected exactly one timeframe field besides " COLOR_FIELD);
    if (!is_tf_name(tf))
        return refuse_at(why, here, "timeframe name '%.40s' is not 1 to 16 of A-Z a-z 0-9 _",
                         tf->str);
    if (!color) return refuse_at(why, here, "missing " COLOR_FIELD);
    int rc = check_number(value, at(row, i, tf->str), why);
    return rc ? rc : check_color(color, at(row, i, COLOR_FIELD), why);
}

static int check_row(const json_value *row, int r, char *why)
{
    if (row->type != JSON_OBJECT) return refuse_at(why, at(r, -1, NULL), "expected an object");
    int rc = check_name(json_get(row, "pair"), at(r, -1, "pair"), 64, why);
    if (rc) return rc;
    const json_value *cells = json_get(row, "TF_data");
    where here = at(r, -1, "TF_data");
    if (!cells) return refuse_at(why, here, "required field missing");
    if (cells->type != JSON_ARRAY) return refuse_at(why, here, "expected a list");
    if (cells->len > MAX_CELLS)
        return refuse_at(why, here, "at most %d timeframe cells, got %u", MAX_CELLS,
                         (unsigned)cells->len);
    for (size_t i = 0; i < cells->len; i++)
        if ((rc = check_cell(&cells->items[i], r, (int)i, why))) return rc;
    if ((rc = check_number(json_get(row, "sum"), at(r, -1, "sum"), why))) return rc;
    return check_color(json_get(row, "sum_cell_color"), at(r, -1, "sum_cell_color"), why);
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
    } else if ((rc = check_name(json_get(doc, "key"), at(-1, -1, "key"), 128, why)) ||
               (rc = check_name(json_get(doc, "src"), at(-1, -1, "src"), 128, why)) ||
               (rc = check_name(json_get(doc, "clientId"), at(-1, -1, "clientId"), 128, why))) {
        /* rc and why are set */
    } else if (!(data = json_get(doc, "data"))) {
        rc = refuse(why, "$.data: required field missing");
    } else if (data->type != JSON_ARRAY) {
        rc = refuse(why, "$.data: expected a list");
    } else {
        for (size_t i = 0; i < data->len && !rc; i++) rc = check_row(&data->items[i], (int)i, why);
    }
    if (rc) json_free(doc);
    return rc;
}
