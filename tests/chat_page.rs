//! The chat page in a real headless browser: Debian's chromium driven through chromedriver's
//! WebDriver HTTP API (plain JSON, spoken here with ureq), against `awq-run serve` on the tiny
//! model. The page loads and shows the model, a message sent from the text box streams a reply
//! into the page, and Stop ends it (the server sees the client go). Skipped, saying why, where
//! chromium or chromedriver is missing (scripts/test.sh installs them).
mod common;
use common::TinySpec;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `f` every 100 ms for up to `secs`; panics with `what` if it never holds.
fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t.elapsed() < Duration::from_secs(secs), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every WebDriver call gives up after this: a stuck browser fails the test, never hangs it.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

struct Browser {
    base: String,
    session: String,
}

impl Drop for Browser {
    /// Ends the session, which closes chromium (killing chromedriver alone leaves it running).
    fn drop(&mut self) {
        let _ = ureq::delete(&format!("{}/session/{}", self.base, self.session)).timeout(CALL_TIMEOUT).call();
    }
}

impl Browser {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let req = ureq::request(method, &url).timeout(CALL_TIMEOUT);
        let r = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        let resp = match r {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        resp.into_json::<Value>().unwrap()["value"].clone()
    }
    /// The element id of the first match of a CSS selector, if any.
    fn find(&self, css: &str) -> Option<String> {
        let v = self.call("POST", "/element", Some(json!({"using": "css selector", "value": css})));
        v.as_object()?.values().next()?.as_str().map(str::to_string)
    }
    fn text(&self, css: &str) -> String {
        self.find(css).map(|e| self.call("GET", &format!("/element/{e}/text"), None).as_str().unwrap_or("").to_string()).unwrap_or_default()
    }
    fn click(&self, css: &str) {
        let e = self.find(css).unwrap_or_else(|| panic!("no {css}"));
        self.call("POST", &format!("/element/{e}/click"), Some(json!({})));
    }
    fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).unwrap_or_else(|| panic!("no {css}"));
        self.call("POST", &format!("/element/{e}/value"), Some(json!({"text": text})));
    }
    fn enabled(&self, css: &str) -> bool {
        let e = self.find(css).unwrap_or_else(|| panic!("no {css}"));
        self.call("GET", &format!("/element/{e}/enabled"), None).as_bool().unwrap_or(false)
    }
}

#[test]
fn the_chat_page_streams_a_reply_and_stops_it() {
    let (chromium, driver) = (Path::new("/usr/bin/chromium"), Path::new("/usr/bin/chromedriver"));
    if !chromium.exists() || !driver.exists() {
        eprintln!("skipped: {} or {} is missing (apt-get install chromium chromium-driver)", chromium.display(), driver.display());
        return;
    }
    // A tiny model with a long context whose end-of-sequence token it never samples (the id is
    // outside its vocabulary), so the reply streams for minutes, until Stop.
    let dir = tempfile::tempdir().unwrap();
    let mut spec = TinySpec::new(awq_run::model::Arch::Llama);
    spec.max_pos = 65536;
    let model = spec.write_dir(&dir.path().join("tiny"));
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(model.join("config.json")).unwrap()).unwrap();
    cfg["eos_token_id"] = json!(99999);
    std::fs::write(model.join("config.json"), cfg.to_string()).unwrap();
    std::fs::write(model.join("generation_config.json"), "{}").unwrap();
    let tc = json!({"chat_template": common::CHATML_TEMPLATE, "bos_token": "<|im_start|>", "eos_token": null});
    std::fs::write(model.join("tokenizer_config.json"), tc.to_string()).unwrap();

    let (server, site) = common::spawn_server(&model, &["--served-model-name", "tiny-page"]);
    let _server = Kill(server);

    let port = free_port();
    let _driver = Kill(Command::new(driver).arg(format!("--port={port}")).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    let base = format!("http://127.0.0.1:{port}");
    wait_for(20, "chromedriver", || ureq::get(&format!("{base}/status")).timeout(Duration::from_secs(2)).call().ok());
    let profile = tempfile::tempdir().unwrap();
    let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
        "binary": chromium,
        "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 format!("--user-data-dir={}", profile.path().display())],
    }}}});
    let v: Value = ureq::post(&format!("{base}/session")).timeout(Duration::from_secs(60)).send_json(caps).unwrap().into_json().unwrap();
    let session = v["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {v}")).to_string();
    let b = Browser { base, session };

    b.call("POST", "/url", Some(json!({"url": format!("{site}/")})));
    wait_for(20, "the model name on the page", || b.text("#model").contains("tiny-page").then_some(()));
    assert!(b.find("#system").is_some(), "the system prompt box");
    b.type_into("#input", "hello there");
    b.click("#send");
    wait_for(20, "the user's message", || (b.text(".user") == "hello there").then_some(()));
    // Streamed text appears, and keeps coming.
    let first = wait_for(60, "streamed text", || Some(b.text(".assistant")).filter(|t| !t.is_empty()));
    wait_for(60, "more streamed text", || (b.text(".assistant").len() > first.len()).then_some(()));
    assert!(b.enabled("#stop") && !b.enabled("#send"), "while streaming: Stop on, Send off");
    b.click("#stop");
    wait_for(20, "the stopped note", || b.text(".note").contains("stopped").then_some(()));
    assert!(b.enabled("#send") && !b.enabled("#stop"));
    // The server saw the client go and freed its blocks.
    wait_for(20, "the cancelled request in /metrics", || {
        let m = ureq::get(&format!("{site}/metrics")).call().ok()?.into_string().ok()?;
        let get = |name: &str| m.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
        (get("awq_run_requests_cancelled_total")? >= 1.0 && get("awq_run_kv_blocks_used")? == 0.0).then_some(())
    });
}
