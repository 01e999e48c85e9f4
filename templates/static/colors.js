// MQL5 colours as EAs send them in `cell_color` / `sum_cell_color`.
//
// An EA usually sends a web-colour name (`clrGreen`), which is what ColorToString(clr, true) gives
// for a named colour; for any other colour it gives "R,G,B". Both are understood here, as are
// MQL5 literals (C'0,128,0') and #RRGGBB. Nothing from the wire reaches CSS unparsed: what comes
// out is three numbers or a verdict.

// The 132 web colours of the MQL5 reference (Constants, Enumerations and Structures > Objects
// Constants > Web Colors), in its order.
// Their values are the CSS/X11 ones, except clrLightGoldenrod, which is CSS lightgoldenrodyellow.
const WEB_COLORS = {
  Black: '#000000', DarkGreen: '#006400', DarkSlateGray: '#2F4F4F', Olive: '#808000',
  Green: '#008000', Teal: '#008080', Navy: '#000080', Purple: '#800080', Maroon: '#800000',
  Indigo: '#4B0082', MidnightBlue: '#191970', DarkBlue: '#00008B', DarkOliveGreen: '#556B2F',
  SaddleBrown: '#8B4513', ForestGreen: '#228B22', OliveDrab: '#6B8E23', SeaGreen: '#2E8B57',
  DarkGoldenrod: '#B8860B', DarkSlateBlue: '#483D8B', Sienna: '#A0522D', MediumBlue: '#0000CD',
  Brown: '#A52A2A', DarkTurquoise: '#00CED1', DimGray: '#696969', LightSeaGreen: '#20B2AA',
  DarkViolet: '#9400D3', FireBrick: '#B22222', MediumVioletRed: '#C71585',
  MediumSeaGreen: '#3CB371', Chocolate: '#D2691E', Crimson: '#DC143C', SteelBlue: '#4682B4',
  Goldenrod: '#DAA520', MediumSpringGreen: '#00FA9A', LawnGreen: '#7CFC00', CadetBlue: '#5F9EA0',
  DarkOrchid: '#9932CC', YellowGreen: '#9ACD32', LimeGreen: '#32CD32', OrangeRed: '#FF4500',
  DarkOrange: '#FF8C00', Orange: '#FFA500', Gold: '#FFD700', Yellow: '#FFFF00',
  Chartreuse: '#7FFF00', Lime: '#00FF00', SpringGreen: '#00FF7F', Aqua: '#00FFFF',
  DeepSkyBlue: '#00BFFF', Blue: '#0000FF', Magenta: '#FF00FF', Red: '#FF0000', Gray: '#808080',
  SlateGray: '#708090', Peru: '#CD853F', BlueViolet: '#8A2BE2', LightSlateGray: '#778899',
  DeepPink: '#FF1493', MediumTurquoise: '#48D1CC', DodgerBlue: '#1E90FF', Turquoise: '#40E0D0',
  RoyalBlue: '#4169E1', SlateBlue: '#6A5ACD', DarkKhaki: '#BDB76B', IndianRed: '#CD5C5C',
  MediumOrchid: '#BA55D3', GreenYellow: '#ADFF2F', MediumAquamarine: '#66CDAA',
  DarkSeaGreen: '#8FBC8F', Tomato: '#FF6347', RosyBrown: '#BC8F8F', Orchid: '#DA70D6',
  MediumPurple: '#9370DB', PaleVioletRed: '#DB7093', Coral: '#FF7F50', CornflowerBlue: '#6495ED',
  DarkGray: '#A9A9A9', SandyBrown: '#F4A460', MediumSlateBlue: '#7B68EE', Tan: '#D2B48C',
  DarkSalmon: '#E9967A', BurlyWood: '#DEB887', HotPink: '#FF69B4', Salmon: '#FA8072',
  Violet: '#EE82EE', LightCoral: '#F08080', SkyBlue: '#87CEEB', LightSalmon: '#FFA07A',
  Plum: '#DDA0DD', Khaki: '#F0E68C', LightGreen: '#90EE90', Aquamarine: '#7FFFD4',
  Silver: '#C0C0C0', LightSkyBlue: '#87CEFA', LightSteelBlue: '#B0C4DE', LightBlue: '#ADD8E6',
  PaleGreen: '#98FB98', Thistle: '#D8BFD8', PowderBlue: '#B0E0E6', PaleGoldenrod: '#EEE8AA',
  PaleTurquoise: '#AFEEEE', LightGray: '#D3D3D3', Wheat: '#F5DEB3', NavajoWhite: '#FFDEAD',
  Moccasin: '#FFE4B5', LightPink: '#FFB6C1', Gainsboro: '#DCDCDC', PeachPuff: '#FFDAB9',
  Pink: '#FFC0CB', Bisque: '#FFE4C4', LightGoldenrod: '#FAFAD2', BlanchedAlmond: '#FFEBCD',
  LemonChiffon: '#FFFACD', Beige: '#F5F5DC', AntiqueWhite: '#FAEBD7', PapayaWhip: '#FFEFD5',
  Cornsilk: '#FFF8DC', LightYellow: '#FFFFE0', LightCyan: '#E0FFFF', Linen: '#FAF0E6',
  Lavender: '#E6E6FA', MistyRose: '#FFE4E1', OldLace: '#FDF5E6', WhiteSmoke: '#F5F5F5',
  Seashell: '#FFF5EE', Ivory: '#FFFFF0', Honeydew: '#F0FFF0', AliceBlue: '#F0F8FF',
  LavenderBlush: '#FFF0F5', MintCream: '#F5FFFA', Snow: '#FFFAFA', White: '#FFFFFF',
};

// Names MetaEditor also accepts although the table above does not list them (the MQL5 book
// writes C'255,0,255' as clrFuchsia, for one).
const ALSO_ACCEPTED = {
  Cyan: '#00FFFF', Fuchsia: '#FF00FF', Azure: '#F0FFFF', DarkCyan: '#008B8B',
  DarkMagenta: '#8B008B', DarkRed: '#8B0000', FloralWhite: '#FFFAF0', GhostWhite: '#F8F8FF',
};

const BY_NAME = new Map();
for (const [name, hex] of Object.entries({ ...WEB_COLORS, ...ALSO_ACCEPTED })) {
  BY_NAME.set(name.toLowerCase(), [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16)));
}

const TRIPLET = /^(?:C')?\s*(\d{1,3})\s*,\s*(\d{1,3})\s*,\s*(\d{1,3})\s*'?$/i;
const HEX = /^#([0-9a-f]{6})$/i;

/**
 * Parse an MQL5 colour string.
 * @returns {{kind: 'none'} | {kind: 'rgb', rgb: number[]} | {kind: 'unknown'}}
 *   'none' for "" and clrNONE (no colour wanted), 'unknown' for anything not understood.
 */
export function parseColor(text) {
  const s = String(text ?? '').trim();
  if (s === '' || s.toLowerCase() === 'clrnone') return { kind: 'none' };
  const lower = s.toLowerCase();
  if (lower.startsWith('clr') && BY_NAME.has(lower.slice(3))) return { kind: 'rgb', rgb: BY_NAME.get(lower.slice(3)) };
  let m = TRIPLET.exec(s);
  if (m) {
    const rgb = m.slice(1, 4).map(Number);
    if (rgb.every((v) => v <= 255)) return { kind: 'rgb', rgb };
  }
  m = HEX.exec(s);
  if (m) return { kind: 'rgb', rgb: [0, 2, 4].map((i) => parseInt(m[1].slice(i, i + 2), 16)) };
  return { kind: 'unknown' };
}
