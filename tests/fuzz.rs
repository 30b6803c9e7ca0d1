//! Fuzzing on the stable toolchain: a mutation loop over a corpus for every decoder that
//! reads bytes from the network (the transport's frame header and hello, the store's
//! request and response, the authentication messages).
//!
//! Each target starts from the seeds in `fuzz/corpus/<target>/` (real encodings; rewrite
//! them with `FERROCOMM_FUZZ_WRITE_CORPUS=1 cargo test --release --test fuzz`), mutates them
//! (bit flips, byte sets, interesting integers at every offset, truncation, extension,
//! splicing two inputs) with a seeded PRNG, and checks for each input that the decoder
//! does not panic and that whatever it accepts re-encodes to the same bytes. It runs for
//! `FERROCOMM_FUZZ_SECS` seconds per target (default 3, at most 60) and prints the seed:
//! `FERROCOMM_FUZZ_SEED` replays a run. A failing input is printed in hex; add it to
//! `regressions` below as a named test.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferrocomm::auth::{self, Channel, ClientHandshake, Secret, ServerHandshake};
use ferrocomm::rendezvous::protocol::{self, Request, Response};
use ferrocomm::wire::{Envelope, FrameHeader, FrameKind, Hello, HelloKind};

const MAX_EAGER: u64 = 64 * 1024;
const MAX_MESSAGE: u64 = 1 << 42;

/// xorshift64*: small, seeded, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: [u64; 10] = [
    0,
    1,
    0x7f,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    i64::MAX as u64,
    u64::MAX,
];

fn mutate(rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut b = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(7) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 if !b.is_empty() => {
                let i = rng.below(b.len());
                b[i] = rng.next() as u8;
            }
            2 if !b.is_empty() => {
                let v = INTERESTING[rng.below(INTERESTING.len())];
                let width = [1, 2, 4, 8][rng.below(4)];
                let at = rng.below(b.len());
                for (k, byte) in v.to_le_bytes().iter().take(width).enumerate() {
                    if let Some(x) = b.get_mut(at + k) {
                        *x = *byte;
                    }
                }
            }
            3 => b.truncate(rng.below(b.len() + 1)),
            4 => {
                let n = rng.below(64);
                b.extend((0..n).map(|_| rng.next() as u8));
            }
            5 => {
                let other = &corpus[rng.below(corpus.len())];
                let cut = rng.below(b.len() + 1);
                let from = rng.below(other.len() + 1);
                b.truncate(cut);
                b.extend_from_slice(&other[from..]);
            }
            _ => {
                if b.len() >= 2 {
                    let (i, j) = (rng.below(b.len()), rng.below(b.len()));
                    b.swap(i, j);
                }
            }
        }
    }
    b
}

/// One fuzz target: a name and a check that panics on a bug.
struct Target {
    name: &'static str,
    seeds: fn() -> Vec<Vec<u8>>,
    check: fn(&[u8]),
}

fn check_frame(b: &[u8]) {
    if let Ok(h) = FrameHeader::decode(b, MAX_EAGER, MAX_MESSAGE) {
        assert_eq!(
            &h.encode()[..],
            &b[..h.encode().len()],
            "re-encoding differs"
        );
        assert!(match h.kind {
            FrameKind::Eager => h.len <= MAX_EAGER,
            FrameKind::Rts | FrameKind::Data => h.len <= MAX_MESSAGE,
            FrameKind::Cts | FrameKind::Bye => h.len == 0,
        });
    }
}

fn check_hello(b: &[u8]) {
    if let Ok(h) = Hello::decode(b) {
        assert_eq!(&h.encode()[..], &b[..32], "re-encoding differs");
    }
}

fn check_request(b: &[u8]) {
    if let Ok(h) = protocol::RequestHeader::decode(b) {
        assert!(h.body_len() <= 2 * protocol::MAX_VALUE_LEN + protocol::MAX_KEY_LIST_LEN);
    }
    if let Ok((req, used)) = protocol::decode_request(b) {
        assert!(used <= b.len());
        let again = protocol::encode_request(&req).expect("a decoded request encodes");
        assert_eq!(again, &b[..used], "re-encoding differs for {req:?}");
    }
}

fn check_response(b: &[u8]) {
    if let Ok((resp, used)) = protocol::decode_response(b) {
        assert!(used <= b.len());
        let again = protocol::encode_response(&resp);
        // Messages (BadRequest, Refused) are decoded lossily from invalid UTF-8 (see
        // `regressions::lossy_message_in_a_refusal`): then the re-encoding is canonical.
        if again != b[..used] {
            assert!(
                matches!(resp, Response::BadRequest(_) | Response::Refused(_)),
                "re-encoding differs for {resp:?}"
            );
            assert_eq!(protocol::decode_response(&again), Ok((resp, again.len())));
        }
    }
}

fn check_auth(b: &[u8]) {
    let key = Secret::new("fuzz").expect("secret");
    let _ = auth::refusal_of(b);
    let _ = auth::is_auth_message(b);
    // Random bytes never pass for a proof; an Init is answered or refused, never a panic.
    if let Ok((server, _)) = ServerHandshake::challenge(&key, Channel::Transport, b) {
        assert!(server.verify(b).is_err());
    }
    if let Ok((client, _)) = ClientHandshake::start(&key, Channel::Transport) {
        assert!(client.answer(b).is_err(), "a random challenge verified");
    }
}

fn frame_seeds() -> Vec<Vec<u8>> {
    [
        (FrameKind::Eager, 8, 0),
        (FrameKind::Eager, 0, 0),
        (FrameKind::Rts, 1 << 20, 7),
        (FrameKind::Cts, 0, 7),
        (FrameKind::Data, 1 << 20, 7),
        (FrameKind::Bye, 0, 0),
    ]
    .into_iter()
    .map(|(kind, len, id)| {
        FrameHeader {
            kind,
            len,
            id,
            env: Envelope([0xab; 32]),
        }
        .encode()
        .to_vec()
    })
    .collect()
}

fn hello_seeds() -> Vec<Vec<u8>> {
    [HelloKind::Request, HelloKind::Accept, HelloKind::Refuse]
        .into_iter()
        .map(|kind| {
            Hello {
                kind,
                job: ferrocomm::wire::job_hash("fuzz"),
                world: 4,
                rank: 1,
                nonce: 0,
            }
            .encode()
            .to_vec()
        })
        .collect()
}

fn request_seeds() -> Vec<Vec<u8>> {
    let t = Duration::from_millis(1500);
    [
        Request::Set {
            key: "k".into(),
            value: b"value".to_vec(),
        },
        Request::Get {
            key: "job/x/peers".into(),
            timeout: t,
        },
        Request::TryGet { key: "a".into() },
        Request::Add {
            key: "n".into(),
            delta: -3,
        },
        Request::CompareSet {
            key: "c".into(),
            expected: Some(b"old".to_vec()),
            desired: b"new".to_vec(),
        },
        Request::CompareSet {
            key: "c".into(),
            expected: None,
            desired: b"new".to_vec(),
        },
        Request::Wait {
            keys: vec!["a".into(), "bb".into()],
            timeout: t,
        },
        Request::Check {
            keys: vec!["a".into(), String::new()],
        },
        Request::Delete { key: "d".into() },
    ]
    .iter()
    .map(|r| protocol::encode_request(r).expect("encode"))
    .collect()
}

fn response_seeds() -> Vec<Vec<u8>> {
    [
        Response::Ok(b"v".to_vec()),
        Response::Ok(Vec::new()),
        Response::NotFound,
        Response::Timeout(vec!["a".into(), "b".into()]),
        Response::BadRequest("no".into()),
        Response::ShuttingDown,
        Response::Refused("full".into()),
    ]
    .iter()
    .map(protocol::encode_response)
    .collect()
}

fn auth_seeds() -> Vec<Vec<u8>> {
    let key = Secret::new("fuzz").expect("secret");
    let (client, init) = ClientHandshake::start(&key, Channel::Transport).expect("start");
    let (_, challenge) =
        ServerHandshake::challenge(&key, Channel::Transport, &init).expect("challenge");
    let proof = client.answer(&challenge).expect("answer");
    vec![
        init.to_vec(),
        challenge.to_vec(),
        proof.to_vec(),
        auth::no_secret_reply().to_vec(),
        auth::required_notice().to_vec(),
    ]
}

const TARGETS: [Target; 5] = [
    Target {
        name: "frame_header",
        seeds: frame_seeds,
        check: check_frame,
    },
    Target {
        name: "hello",
        seeds: hello_seeds,
        check: check_hello,
    },
    Target {
        name: "store_request",
        seeds: request_seeds,
        check: check_request,
    },
    Target {
        name: "store_response",
        seeds: response_seeds,
        check: check_response,
    },
    Target {
        name: "auth",
        seeds: auth_seeds,
        check: check_auth,
    },
];

fn corpus_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The corpus of a target: the files in its directory (written from the seeds when
/// `FERROCOMM_FUZZ_WRITE_CORPUS=1`), plus the seeds themselves.
fn corpus(t: &Target) -> Vec<Vec<u8>> {
    let dir = corpus_dir(t.name);
    let seeds = (t.seeds)();
    if std::env::var("FERROCOMM_FUZZ_WRITE_CORPUS").is_ok_and(|v| v == "1") {
        std::fs::create_dir_all(&dir).expect("corpus directory");
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}.bin")), s).expect("write seed");
        }
    }
    let mut all: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .map(|rd| {
            let mut files: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
            files.sort();
            files
                .into_iter()
                .filter_map(|p| std::fs::read(p).ok())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !all.is_empty(),
        "no corpus in {} (FERROCOMM_FUZZ_WRITE_CORPUS=1 writes it)",
        dir.display()
    );
    all.extend(seeds);
    all
}

fn run(t: &Target) {
    let secs = std::env::var("FERROCOMM_FUZZ_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(3.0)
        .clamp(0.1, 60.0);
    let seed = std::env::var("FERROCOMM_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| getrandom::u64().unwrap_or(0x5eed) | 1);
    let corpus = corpus(t);
    // Every corpus entry passes as is.
    for c in &corpus {
        (t.check)(c);
    }
    let mut rng = Rng(seed);
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let mut runs = 0u64;
    while Instant::now() < until {
        for _ in 0..256 {
            let base = &corpus[rng.below(corpus.len())];
            let input = mutate(&mut rng, base, &corpus);
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| (t.check)(&input))) {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!(
                    "fuzz target {}: input {} failed (seed {seed}): {msg}",
                    t.name,
                    hex(&input)
                );
            }
            runs += 1;
        }
    }
    println!(
        "fuzz target {}: {runs} inputs in {secs} s, seed {seed}, corpus {}",
        t.name,
        corpus.len()
    );
}

#[test]
fn fuzz_frame_header() {
    run(&TARGETS[0]);
}

#[test]
fn fuzz_hello() {
    run(&TARGETS[1]);
}

#[test]
fn fuzz_store_request() {
    run(&TARGETS[2]);
}

#[test]
fn fuzz_store_response() {
    run(&TARGETS[3]);
}

#[test]
fn fuzz_auth_messages() {
    run(&TARGETS[4]);
}

/// Inputs the fuzzer found, kept as named tests.
mod regressions {
    use super::*;

    /// Found by `fuzz_store_response`: a `Refused` reply whose message is not UTF-8 decodes
    /// (lossily, it is only shown to a human) and does not re-encode to the same bytes;
    /// nothing panics.
    #[test]
    fn lossy_message_in_a_refusal() {
        let hex = "52530cfc0105000004000000ffffffff";
        let b: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
        let (resp, used) = protocol::decode_response(&b).expect("decodes");
        assert_eq!(used, b.len());
        assert!(
            matches!(&resp, Response::Refused(m) if m.contains('\u{fffd}')),
            "{resp:?}"
        );
        check_response(&b);
    }
}
