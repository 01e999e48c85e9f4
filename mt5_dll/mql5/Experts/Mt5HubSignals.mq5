//+------------------------------------------------------------------+
//| Mt5HubSignals.mq5: an example EA for mt5hub.                      |
//|                                                                  |
//| Every few seconds it scores a list of pairs on a list of          |
//| timeframes (EMA cross and RSI, on the last closed bar) and pushes |
//| the table to the hub in the seed's JSON format:                   |
//|   {"key","src","clientId","data":[{"pair","TF_data":[{"H1":0.42,  |
//|    "cell_color":"clrGreen"},...],"sum","sum_cell_color"},...]}    |
//| Needs mt5hub.dll in MQL5\Libraries and "Allow DLL imports".       |
//+------------------------------------------------------------------+
#property copyright   "mt5hub"
#property version     "1.00"
#property description "Pushes an EMA/RSI signal table for several pairs and timeframes to an mt5hub hub."

#include <Mt5Hub.mqh>

input string InpHubUrl          = "wss://127.0.0.1:8443/ws/dll";   // Hub URL (wss://host:port/ws/dll)
input string InpHubToken        = "";                              // Publisher token
input string InpCertSha256      = "";                              // Hub certificate SHA-256 (self-signed hub: pin it)
input bool   InpAllowAnyCert    = false;                           // Accept ANY certificate (tests only: the token can leak)
input string InpKey             = "EA1";                           // Table key
input string InpPairs           = "EURUSD,GBPUSD,USDJPY,AUDUSD";   // Pairs, comma-separated
input string InpTimeframes      = "M5,M15,H1,H4,D1";               // Timeframes, comma-separated
input int    InpFastEma         = 12;                              // Fast EMA period
input int    InpSlowEma         = 26;                              // Slow EMA period
input int    InpRsiPeriod       = 14;                              // RSI period
input int    InpTimerSeconds    = 5;                               // Publish every N seconds
input bool   InpPublishInTester = false;                           // Publish from the Strategy Tester too

CMt5Hub         g_hub;
string          g_pairs[];
string          g_tf_names[];   // upper case, as sent: "M5", "H1", ...
ENUM_TIMEFRAMES g_tfs[];
int             g_fast[];       // indicator handles, index pair * timeframes + timeframe
int             g_slow[];
int             g_rsi[];
string          g_src;
string          g_client_id;

//+------------------------------------------------------------------+
int OnInit()
  {
//--- A backtest publishing under the live key/src would overwrite the live tables on every
//--- dashboard: in the Strategy Tester (and optimisation) the EA stays quiet unless told.
   if((MQLInfoInteger(MQL_TESTER) || MQLInfoInteger(MQL_OPTIMIZATION)) && !InpPublishInTester)
     {
      Print("mt5hub: in the Strategy Tester: not publishing (backtest tables would overwrite ",
            "the live ones); set \"Publish from the Strategy Tester too\" to publish anyway");
      return(INIT_SUCCEEDED);
     }
   if(!TerminalInfoInteger(TERMINAL_DLLS_ALLOWED) || !MQLInfoInteger(MQL_DLLS_ALLOWED))
     {
      Print("mt5hub: allow DLL imports (Tools > Options > Expert Advisors, and in this EA's settings)");
      return(INIT_FAILED);
     }
   if(Mt5HubVersion() != MT5HUB_VERSION)
     {
      PrintFormat("mt5hub: mt5hub.dll speaks protocol %d, this EA %d: update both together",
                  Mt5HubVersion(), MT5HUB_VERSION);
      return(INIT_FAILED);
     }
   if(SplitList(InpPairs, g_pairs) == 0 || SplitList(InpTimeframes, g_tf_names) == 0)
     {
      Print("mt5hub: set at least one pair and one timeframe");
      return(INIT_PARAMETERS_INCORRECT);
     }
   if(InpFastEma < 1 || InpSlowEma <= InpFastEma || InpRsiPeriod < 2 || InpTimerSeconds < 1)
     {
      Print("mt5hub: need 1 <= fast EMA < slow EMA, RSI period >= 2, timer >= 1 s");
      return(INIT_PARAMETERS_INCORRECT);
     }

   int pairs = ArraySize(g_pairs), timeframes = ArraySize(g_tf_names);
   ArrayResize(g_tfs, timeframes);
   for(int t = 0; t < timeframes; t++)
     {
      string          name = g_tf_names[t];
      ENUM_TIMEFRAMES timeframe = PERIOD_CURRENT;
      if(!ParseTimeframe(name, timeframe))
        {
         PrintFormat("mt5hub: unknown timeframe %s (use M1...M30, H1...H12, D1, W1, MN1)", name);
         return(INIT_PARAMETERS_INCORRECT);
        }
      g_tf_names[t] = name;
      g_tfs[t] = timeframe;
     }
   ArrayResize(g_fast, pairs * timeframes);
   ArrayResize(g_slow, pairs * timeframes);
   ArrayResize(g_rsi, pairs * timeframes);
   ArrayInitialize(g_fast, INVALID_HANDLE);
   ArrayInitialize(g_slow, INVALID_HANDLE);
   ArrayInitialize(g_rsi, INVALID_HANDLE);
   for(int p = 0; p < pairs; p++)
     {
      if(!SymbolSelect(g_pairs[p], true))
        {
         PrintFormat("mt5hub: symbol %s is not offered by this broker", g_pairs[p]);
         return(INIT_PARAMETERS_INCORRECT);
        }
      for(int t = 0; t < timeframes; t++)
        {
         int i = p * timeframes + t;
         g_fast[i] = iMA(g_pairs[p], g_tfs[t], InpFastEma, 0, MODE_EMA, PRICE_CLOSE);
         g_slow[i] = iMA(g_pairs[p], g_tfs[t], InpSlowEma, 0, MODE_EMA, PRICE_CLOSE);
         g_rsi[i]  = iRSI(g_pairs[p], g_tfs[t], InpRsiPeriod, PRICE_CLOSE);
         if(g_fast[i] == INVALID_HANDLE || g_slow[i] == INVALID_HANDLE || g_rsi[i] == INVALID_HANDLE)
           {
            PrintFormat("mt5hub: cannot create indicators for %s %s (error %d)",
                        g_pairs[p], g_tf_names[t], GetLastError());
            return(INIT_FAILED);
           }
        }
     }

   g_src = _Symbol + "_" + EnumToString((ENUM_TIMEFRAMES)_Period);   // e.g. EURUSD_PERIOD_H1
   g_client_id = InpKey + "_" + IntegerToString(AccountInfoInteger(ACCOUNT_LOGIN));
//--- OnTimer calls Report (Mt5HubStatus), which renews the handle's lease: three missed timer
//--- periods (and at least the default minute) and the DLL takes the EA for gone.
   int lease = MathMax(MT5HUB_LEASE_DEFAULT, 3 * InpTimerSeconds);
   if(!g_hub.Open(InpHubUrl, InpHubToken, InpAllowAnyCert, InpCertSha256, lease))
      return(INIT_PARAMETERS_INCORRECT);
   EventSetTimer(InpTimerSeconds);
   return(INIT_SUCCEEDED);
  }

//+------------------------------------------------------------------+
void OnDeinit(const int reason)
  {
   EventKillTimer();
   g_hub.Close();   // returns at once; the DLL flushes and closes in the background
   ReleaseIndicators(g_fast);
   ReleaseIndicators(g_slow);
   ReleaseIndicators(g_rsi);
  }

//+------------------------------------------------------------------+
//| The DLL is called from the timer, never waited on in OnTick.     |
//+------------------------------------------------------------------+
void OnTimer()
  {
   string json = BuildTable();
   if(json != "")
     {
      int result = g_hub.Send(json);
      if(result < 0)
         PrintFormat("mt5hub: table not sent: %s", Mt5HubResultText(result));
     }
   g_hub.Report();
  }

//+------------------------------------------------------------------+
//| The table as JSON; "" while no indicator has data yet.           |
//+------------------------------------------------------------------+
string BuildTable()
  {
   int    timeframes = ArraySize(g_tfs);
   string rows = "";
   for(int p = 0; p < ArraySize(g_pairs); p++)
     {
      string cells = "";
      double sum = 0.0;
      int    scored = 0;
      for(int t = 0; t < timeframes; t++)
        {
         double score = 0.0;
         if(!CellScore(p * timeframes + t, score))
            continue;   // history still loading: the cell appears on a later tick
         sum += score;
         scored++;
         if(cells != "")
            cells += ",";
         cells += "{" + Mt5HubJsonString(g_tf_names[t]) + ":" + Mt5HubJsonNumber(score, 2) +
                  ",\"cell_color\":" + Mt5HubJsonString(ScoreColor(score, 1)) + "}";
        }
      if(scored == 0)
         continue;
      if(rows != "")
         rows += ",";
      rows += "{\"pair\":" + Mt5HubJsonString(g_pairs[p]) +
              ",\"TF_data\":[" + cells + "]" +
              ",\"sum\":" + Mt5HubJsonNumber(sum, 2) +
              ",\"sum_cell_color\":" + Mt5HubJsonString(ScoreColor(sum, scored)) + "}";
     }
   if(rows == "")
      return("");
   return("{\"key\":" + Mt5HubJsonString(InpKey) +
          ",\"src\":" + Mt5HubJsonString(g_src) +
          ",\"clientId\":" + Mt5HubJsonString(g_client_id) +
          ",\"data\":[" + rows + "]}");
  }

//+------------------------------------------------------------------+
//| Score of cell i on the last closed bar, -1 (bearish) to +1        |
//| (bullish): half from the EMA cross, half from RSI's distance to   |
//| 50. False if the indicator has no data yet.                      |
//+------------------------------------------------------------------+
bool CellScore(const int i, double &score)
  {
   double fast[1], slow[1], rsi[1];
   if(CopyBuffer(g_fast[i], 0, 1, 1, fast) != 1 ||
      CopyBuffer(g_slow[i], 0, 1, 1, slow) != 1 ||
      CopyBuffer(g_rsi[i], 0, 1, 1, rsi) != 1)
      return(false);
   double trend = fast[0] > slow[0] ? 0.5 : (fast[0] < slow[0] ? -0.5 : 0.0);
   score = NormalizeDouble(trend + (rsi[0] - 50.0) / 100.0, 2);
   return(MathIsValidNumber(score));
  }

//--- Green or red once the average score per cell passes +-0.25, grey in between.
string ScoreColor(const double value, const int cells)
  {
   double threshold = 0.25 * cells;
   if(value >= threshold)
      return("clrGreen");
   if(value <= -threshold)
      return("clrRed");
   return("clrGray");
  }

//+------------------------------------------------------------------+
//| Helpers                                                          |
//+------------------------------------------------------------------+
//--- Comma-separated text to trimmed, non-empty items; returns how many.
int SplitList(const string text, string &items[])
  {
   string parts[];
   int    count = StringSplit(text, ',', parts);
   ArrayResize(items, 0);
   for(int i = 0; i < count; i++)
     {
      string item = parts[i];
      StringTrimLeft(item);
      StringTrimRight(item);
      if(item == "")
         continue;
      int size = ArraySize(items);
      ArrayResize(items, size + 1);
      items[size] = item;
     }
   return(ArraySize(items));
  }

//--- "h1" -> PERIOD_H1; upper-cases name in place, as the hub shows it.
bool ParseTimeframe(string &name, ENUM_TIMEFRAMES &timeframe)
  {
   string          names[]  = {"M1", "M2", "M3", "M4", "M5", "M6", "M10", "M12", "M15", "M20", "M30",
                               "H1", "H2", "H3", "H4", "H6", "H8", "H12", "D1", "W1", "MN1"};
   ENUM_TIMEFRAMES values[] = {PERIOD_M1, PERIOD_M2, PERIOD_M3, PERIOD_M4, PERIOD_M5, PERIOD_M6,
                               PERIOD_M10, PERIOD_M12, PERIOD_M15, PERIOD_M20, PERIOD_M30,
                               PERIOD_H1, PERIOD_H2, PERIOD_H3, PERIOD_H4, PERIOD_H6, PERIOD_H8,
                               PERIOD_H12, PERIOD_D1, PERIOD_W1, PERIOD_MN1};
   StringToUpper(name);
   for(int i = 0; i < ArraySize(names); i++)
      if(names[i] == name)
        {
         timeframe = values[i];
         return(true);
        }
   return(false);
  }

void ReleaseIndicators(int &handles[])
  {
   for(int i = 0; i < ArraySize(handles); i++)
      if(handles[i] != INVALID_HANDLE)
         IndicatorRelease(handles[i]);
   ArrayResize(handles, 0);
  }
//+------------------------------------------------------------------+
