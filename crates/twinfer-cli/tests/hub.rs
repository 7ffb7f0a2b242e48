//! `--model org/name[@revision]` against a stand-in for the Hugging Face Hub (its `resolve`
//! endpoint as `huggingface_hub` and hf-hub use it: ranged GETs, `x-repo-commit`, ETags, 404 for
//! a file the repository lacks), serving the test models: fetched once into the Hub cache layout,
//! equal to the local folder's results, then loaded with no request at all, also with
//! `HF_HUB_OFFLINE=1` and no server; a pinned revision, one GGUF file of a repository, an
//! embedding model, and the errors for a missing repository and an uncached offline one.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use twinfer_tests::cli::command;
use twinfer_tests::models::model_dir;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// The stand-in Hub: repositories (name -> folder) at one commit, and the paths it was asked for.
struct Hub {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Hub {
    fn start(repos: HashMap<&'static str, PathBuf>) -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (repos, log) = (repos.clone(), log.clone());
                std::thread::spawn(move || serve(stream, &repos, &log));
            }
        });
        Hub { url, requests }
    }

    fn count(&self) -> usize {
        self.requests.lock().unwrap().len()
    }
}

/// One connection: requests answered until the client closes it.
fn serve(stream: TcpStream, repos: &HashMap<&'static str, PathBuf>, log: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut range = None;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("range")
            {
                range = v.trim().strip_prefix("bytes=").map(str::to_string);
            }
        }
        log.lock().unwrap().push(path.clone());
        let body = file_for(&path, repos).and_then(|p| std::fs::read(p).ok());
        let response = match body {
            None => b"HTTP/1.1 404 Not Found\r\nx-error-code: EntryNotFound\r\ncontent-length: 0\r\n\r\n".to_vec(),
            Some(bytes) => {
                let size = bytes.len();
                let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
                    Some((a, b)) => {
                        let a: usize = a.parse().unwrap_or(0);
                        let b: usize = b.parse().map(|b: usize| b + 1).unwrap_or(size);
                        (a.min(size), b.min(size))
                    }
                    None => (0, size),
                };
                let status = if range.is_some() { "206 Partial Content" } else { "200 OK" };
                // The ETag names the blob in the cache: any stable digest of the content will do.
                let etag = bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3));
                let mut r = format!(
                    "HTTP/1.1 {status}\r\nx-repo-commit: {COMMIT}\r\netag: \"{etag:016x}{size:x}\"\r\ncontent-range: bytes {start}-{}/{size}\r\ncontent-length: {}\r\n\r\n",
                    end.saturating_sub(1),
                    end - start
                )
                .into_bytes();
                r.extend_from_slice(&bytes[start..end]);
                r
            }
        };
        if out.write_all(&response).is_err() {
            return;
        }
    }
}

/// `/{org}/{name}/resolve/{main or the commit}/{file}` -> the file, if the repository has it.
fn file_for(path: &str, repos: &HashMap<&'static str, PathBuf>) -> Option<PathBuf> {
    let mut parts = path.trim_start_matches('/').splitn(5, '/');
    let (org, name, verb, rev, file) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if verb != "resolve" || !(rev == "main" || rev == COMMIT) || file.contains("..") {
        return None;
    }
    let p = repos.get(format!("{org}/{name}").as_str())?.join(file);
    p.is_file().then_some(p)
}

fn twinfer(args: &[&str], env: &[(&str, &str)]) -> Output {
    command(env!("CARGO_BIN_EXE_twinfer"))
        .env_remove("HF_HUB_OFFLINE")
        .envs(env.iter().copied())
        .args(args)
        .output()
        .expect("the binary runs")
}

fn json(args: &[&str], env: &[(&str, &str)]) -> Value {
    let out = twinfer(args, env);
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn fails(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = twinfer(args, env);
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn temp_home(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("twinfer-hub-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_hub_model_is_fetched_once_then_loads_with_no_request() {
    let llama = model_dir("tiny-llama");
    let minilm = model_dir("all-MiniLM-L6-v2");
    let hub = Hub::start(HashMap::from([("test-org/tiny-llama", llama.clone()), ("test-org/minilm", minilm.clone())]));
    let home = temp_home("fetch");
    let env = [("HF_HOME", s(&home)), ("HF_ENDPOINT", hub.url.as_str())];
    let run = ["run", "--prompt", "the river", "--max-tokens", "8", "--json", "--model"];
    let local = json(&[&run[..], &[s(&llama)]].concat(), &env);

    let fetched = json(&[&run[..], &["test-org/tiny-llama"]].concat(), &env);
    assert_eq!(fetched["tokens"], local["tokens"], "the Hub copy generates what the local folder does");
    let asked = hub.count();
    let snapshot = home.join("hub/models--test-org--tiny-llama/snapshots").join(COMMIT);
    for file in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert!(snapshot.join(file).is_file(), "{file} is in the Hub cache layout");
    }
    eprintln!("first load: {asked} requests: {:?}", hub.requests.lock().unwrap());

    // Cached: the same answer with no request, even for the files the repository lacks.
    let again = json(&[&run[..], &["test-org/tiny-llama"]].concat(), &env);
    assert_eq!(again["tokens"], local["tokens"]);
    assert_eq!(hub.count(), asked, "a cached model makes no request");
    let offline = [("HF_HOME", s(&home)), ("HF_ENDPOINT", "http://127.0.0.1:9"), ("HF_HUB_OFFLINE", "1")];
    assert_eq!(json(&[&run[..], &["test-org/tiny-llama"]].concat(), &offline)["tokens"], local["tokens"]);

    // A pinned revision is its own cache entry; the answer is the same.
    let pinned = format!("test-org/tiny-llama@{COMMIT}");
    assert_eq!(json(&[&run[..], &[pinned.as_str()]].concat(), &env)["tokens"], local["tokens"]);

    // An encoder through its optional files (sentence_bert_config.json).
    let embed = |model: &str| json(&["embed", "--json", "--model", model, "a cat sat"], &env)["embeddings"].clone();
    assert_eq!(embed("test-org/minilm"), embed(s(&minilm)), "the Hub copy embeds as the local folder does");

    let missing = fails(&[&run[..], &["test-org/missing"]].concat(), &env);
    assert!(missing.contains("test-org/missing") && missing.contains("404"), "{missing}");
    let uncached = fails(&[&run[..], &["test-org/other"]].concat(), &offline);
    assert!(uncached.contains("HF_HUB_OFFLINE"), "{uncached}");
    let _ = std::fs::remove_dir_all(&home);
}

#[test]
fn one_gguf_file_of_a_hub_repository() {
    let dir = model_dir("smollm2");
    let file = "SmolLM2-135M-Instruct.Q4_1.gguf";
    if !dir.join(file).is_file() {
        assert!(std::env::var("CI").is_err(), "{file} is missing in CI");
        return eprintln!("SKIPPED: {file} is missing (scripts/fetch-models.sh)");
    }
    let hub = Hub::start(HashMap::from([("test-org/smollm2", dir.clone())]));
    let home = temp_home("gguf");
    let env = [("HF_HOME", s(&home)), ("HF_ENDPOINT", hub.url.as_str())];
    let run = ["run", "--prompt", "What is the capital of France?", "--max-tokens", "4", "--json", "--model"];
    let local = json(&[&run[..], &[s(&dir.join(file))]].concat(), &env);
    let spec = format!("test-org/smollm2/{file}");
    let fetched = json(&[&run[..], &[spec.as_str()]].concat(), &env);
    assert_eq!(fetched["tokens"], local["tokens"]);
    // Only the file itself is asked for (metadata, then its bytes).
    let asked = hub.requests.lock().unwrap().clone();
    assert!(asked.iter().all(|p| p.ends_with(file)), "{asked:?}");
    let _ = std::fs::remove_dir_all(&home);
}

/// The stand-in itself: ranges and 404s as the client expects them.
#[test]
fn the_stand_in_answers_ranges_and_404s() {
    let dir = model_dir("tiny-llama");
    let hub = Hub::start(HashMap::from([("o/n", dir.clone())]));
    let addr = hub.url.trim_start_matches("http://");
    let ask = |path: &str, range: &str| {
        let mut c = TcpStream::connect(addr).unwrap();
        write!(c, "GET {path} HTTP/1.1\r\nhost: x\r\n{range}\r\n").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut text = Vec::new();
        c.read_to_end(&mut text).unwrap();
        String::from_utf8_lossy(&text).into_owned()
    };
    let size = std::fs::metadata(dir.join("config.json")).unwrap().len();
    let r = ask("/o/n/resolve/main/config.json", "range: bytes=0-0\r\n");
    assert!(r.starts_with("HTTP/1.1 206") && r.contains(&format!("content-range: bytes 0-0/{size}")), "{r}");
    assert!(ask("/o/n/resolve/main/nope.json", "").starts_with("HTTP/1.1 404"));
    assert!(ask("/o/n/resolve/other/config.json", "").starts_with("HTTP/1.1 404"));
}
