//+------------------------------------------------------------------+
//| Mt5Hub.mqh: push signal tables to an mt5hub hub through          |
//| mt5hub.dll. Put the DLL in MQL5\Libraries, this file in          |
//| MQL5\Include; see mt5_dll/README.md.                              |
//|                                                                  |
//| Every DLL call returns at once: a background thread in the DLL   |
//| connects, sends, reconnects. Call Send and Report from OnTimer,  |
//| Close from OnDeinit.                                              |
//+------------------------------------------------------------------+
#ifndef MT5HUB_MQH
#define MT5HUB_MQH

//--- Keep in step with mt5_dll/include/mt5hub.h.
#define MT5HUB_VERSION             1

#define MT5HUB_FLAG_INSECURE_TLS   1   // accept ANY certificate: tests only (see Mt5HubOpenPinned)

#define MT5HUB_STATE_CONNECTING    0
#define MT5HUB_STATE_CONNECTED     1
#define MT5HUB_STATE_WAITING       2   // link down, retrying after a backoff delay
#define MT5HUB_STATE_REJECTED      3   // the hub refused the token; still retrying

#define MT5HUB_QUEUED              0
#define MT5HUB_COALESCED           1   // replaced a state of the same table not sent yet
#define MT5HUB_E_HANDLE           -1
#define MT5HUB_E_ARG              -2
#define MT5HUB_E_URL              -3
#define MT5HUB_E_JSON             -4
#define MT5HUB_E_NOT_TABLE        -5
#define MT5HUB_E_TOO_LARGE        -6
#define MT5HUB_E_FULL             -7
#define MT5HUB_E_LIMIT            -8
#define MT5HUB_E_SYSTEM           -9
#define MT5HUB_E_INVALID         -10   // a publish the hub would refuse: LastError() names the rule

#define MT5HUB_STAT_SENT           0
#define MT5HUB_STAT_COALESCED      1
#define MT5HUB_STAT_CONNECTS       2
#define MT5HUB_STAT_HUB_ERRORS     3
#define MT5HUB_STAT_ERRORS         4
#define MT5HUB_STAT_TABLES         5
#define MT5HUB_STAT_BYTES          6
#define MT5HUB_STAT_PINGS          7
#define MT5HUB_STAT_RETRY_MS       8   // delay before the next reconnect attempt, 0 while connected
#define MT5HUB_STAT_SEND_RATE      9   // frames per minute at most (lower once the hub said its limit)
#define MT5HUB_STAT_RESENT        10   // tables sent again after the hub dropped frames (rate limit)

#define MT5HUB_LEASE_DEFAULT      60   // s without a call before the DLL closes a handle

#define MT5HUB_ERROR_CHARS         512 // the DLL keeps its last error in fewer characters

//--- MQL5 passes a string as a UTF-16 pointer, int& as a pointer, an array as its data.
#import "mt5hub.dll"
int  Mt5HubOpen(string url, string token, int flags);
int  Mt5HubOpenPinned(string url, string token, string sha256_fingerprint);
int  Mt5HubSend(int handle, string json);
int  Mt5HubStatus(int handle, int &queued);
int  Mt5HubLastError(int handle, ushort &buffer[], int size);
long Mt5HubStat(int handle, int which);
int  Mt5HubClose(int handle);
int  Mt5HubSetLease(int handle, int seconds);
int  Mt5HubThreads(void);
int  Mt5HubVersion(void);
#import

//+------------------------------------------------------------------+
//| Words for results and states, for the Experts log.               |
//+------------------------------------------------------------------+
string Mt5HubResultText(const int result)
  {
   switch(result)
     {
      case MT5HUB_QUEUED:      return("queued");
      case MT5HUB_COALESCED:   return("queued, replacing a state not sent yet");
      case MT5HUB_E_HANDLE:    return("unknown or closed handle");
      case MT5HUB_E_ARG:       return("empty text, broken UTF-16, unknown flag or a line break in the token");
      case MT5HUB_E_URL:       return("URL must be ws://host[:port][/path] or wss://...");
      case MT5HUB_E_JSON:      return("not a JSON object (NaN and infinity are not JSON)");
      case MT5HUB_E_NOT_TABLE: return("JSON object without string \"key\" and \"src\"");
      case MT5HUB_E_TOO_LARGE: return("message too large for the hub");
      case MT5HUB_E_FULL:      return("too many tables waiting (512 or 16 MiB)");
      case MT5HUB_E_LIMIT:     return("too many open handles (64)");
      case MT5HUB_E_SYSTEM:    return("out of memory or no thread");
      case MT5HUB_E_INVALID:   return("a table the hub would refuse (see the last error for the rule)");
     }
   return("result " + IntegerToString(result));
  }

string Mt5HubStateText(const int state)
  {
   switch(state)
     {
      case MT5HUB_STATE_CONNECTING: return("connecting");
      case MT5HUB_STATE_CONNECTED:  return("connected");
      case MT5HUB_STATE_WAITING:    return("disconnected, retrying");
      case MT5HUB_STATE_REJECTED:   return("token refused by the hub, retrying");
     }
   return(Mt5HubResultText(state));
  }

//+------------------------------------------------------------------+
//| JSON building blocks. The DLL checks the JSON and sends it as    |
//| UTF-8, so any text (non-ASCII included) can go in as it is.      |
//+------------------------------------------------------------------+
//--- A JSON string literal: quotes, backslashes and control characters escaped.
string Mt5HubJsonString(const string text)
  {
   string out = "\"";
   int    length = StringLen(text);
   for(int i = 0; i < length; i++)
     {
      ushort ch = StringGetCharacter(text, i);
      if(ch == '\"')
         out += "\\\"";
      else if(ch == '\\')
         out += "\\\\";
      else if(ch == '\n')
         out += "\\n";
      else if(ch == '\r')
         out += "\\r";
      else if(ch == '\t')
         out += "\\t";
      else if(ch < 0x20)
         out += StringFormat("\\u%04x", ch);
      else
         out += ShortToString(ch);
     }
   return(out + "\"");
  }

//--- A JSON number. JSON has no NaN or infinity: those become null, which the hub rejects with
//--- a bad_schema error naming the cell (shown by Report), instead of a silently wrong value.
string Mt5HubJsonNumber(const double value, const int digits = 2)
  {
   if(!MathIsValidNumber(value))
      return("null");
   return(DoubleToString(value, digits));
  }

//+------------------------------------------------------------------+
//| One hub connection. Close() runs from the destructor too, so a    |
//| global CMt5Hub never leaves its DLL thread behind. If the EA dies |
//| without OnDeinit, the DLL closes the handle once no call renewed  |
//| its lease for lease_seconds: call Report (or Send) from OnTimer.  |
//+------------------------------------------------------------------+
class CMt5Hub
  {
private:
   int               m_handle;
   int               m_reported_state;
   long              m_reported_errors;
   string            m_reported_text;

public:
                     CMt5Hub(void) : m_handle(0), m_reported_state(-100), m_reported_errors(0) {}
                    ~CMt5Hub(void) { Close(); }

   //--- Start connecting in the background. False (and a log line) if url or token are unusable.
   //--- allow_any_certificate: tests only (anyone on the path could read the token).
   //--- certificate_sha256: for a hub with a self-signed certificate, its SHA-256 fingerprint (the
   //--- hub logs it at start): exactly that certificate is accepted.
   //--- lease_seconds: longer than the EA's timer period (0: no lease).
   bool              Open(const string url, const string token,
                          const bool allow_any_certificate = false,
                          const string certificate_sha256 = "",
                          const int lease_seconds = MT5HUB_LEASE_DEFAULT)
     {
      Close();
      int handle = certificate_sha256 != "" ? Mt5HubOpenPinned(url, token, certificate_sha256)
                   : Mt5HubOpen(url, token, allow_any_certificate ? MT5HUB_FLAG_INSECURE_TLS : 0);
      if(handle <= 0)
        {
         PrintFormat("mt5hub: cannot open %s: %s", url, Mt5HubResultText(handle));
         return(false);
        }
      if(lease_seconds != MT5HUB_LEASE_DEFAULT)
         Mt5HubSetLease(handle, lease_seconds);
      m_handle = handle;
      m_reported_state = -100;
      m_reported_errors = 0;
      m_reported_text = "";
      return(true);
     }

   bool              IsOpen(void) const { return(m_handle > 0); }

   //--- Queue json as the latest state of its table (key, src). Returns MT5HUB_QUEUED,
   //--- MT5HUB_COALESCED or an MT5HUB_E_* error; never waits for the network.
   int               Send(const string json)
     {
      if(m_handle <= 0)
         return(MT5HUB_E_HANDLE);
      return(Mt5HubSend(m_handle, json));   // MT5HUB_E_INVALID: LastError() (Report) says why
     }

   int               State(void)
     {
      int queued = 0;
      if(m_handle <= 0)
         return(MT5HUB_E_HANDLE);
      return(Mt5HubStatus(m_handle, queued));
     }

   //--- Tables waiting to be sent.
   int               Queued(void)
     {
      int queued = 0;
      if(m_handle > 0)
         Mt5HubStatus(m_handle, queued);
      return(queued);
     }

   long              Stat(const int which)
     {
      if(m_handle <= 0)
         return(MT5HUB_E_HANDLE);
      return(Mt5HubStat(m_handle, which));
     }

   string            LastError(void)
     {
      if(m_handle <= 0)
         return("");
      ushort buffer[];
      ArrayResize(buffer, MT5HUB_ERROR_CHARS);
      if(Mt5HubLastError(m_handle, buffer, MT5HUB_ERROR_CHARS) <= 0)
         return("");
      return(ShortArrayToString(buffer));
     }

   //--- Print state changes and new errors (a wrong token, a TLS problem, the hub's error frames).
   void              Report(void)
     {
      if(m_handle <= 0)
         return;
      int queued = 0;
      int state = Mt5HubStatus(m_handle, queued);
      if(state != m_reported_state)
        {
         PrintFormat("mt5hub: %s (%d tables waiting)", Mt5HubStateText(state), queued);
         m_reported_state = state;
        }
      long errors = Mt5HubStat(m_handle, MT5HUB_STAT_ERRORS);
      if(errors != m_reported_errors)
        {
         m_reported_errors = errors;
         string text = LastError();
         if(text != m_reported_text)   // a retry loop repeats its error: print it once
           {
            Print("mt5hub: ", text);
            m_reported_text = text;
           }
        }
     }

   //--- Returns at once: the DLL still sends what is queued (up to 2 s), then closes.
   void              Close(void)
     {
      if(m_handle > 0)
         Mt5HubClose(m_handle);
      m_handle = 0;
     }
  };

#endif
//+------------------------------------------------------------------+
