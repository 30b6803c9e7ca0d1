//! Checkpoints on disk: a save killed midway never destroys the previous checkpoint, and a
//! file written here loads in Python's `safetensors` package with the same values.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferrocomm::ddp::{Checkpoint, CheckpointDir};

const ROLE: &str = "FERROCOMM_TEST_CHECKPOINT_ROLE";

/// The checkpoint of `step`: content derived from the step, large enough that a save takes
/// a while (16 MiB), so kills land in the middle of writes.
fn checkpoint_of(step: u64) -> Checkpoint {
    let n = 4 << 20;
    let w: Vec<f32> = (0..n).map(|i| (i as u64 ^ step) as f32).collect();
    let mut c = Checkpoint::new();
    c.insert("w", &[n], &w).unwrap();
    c.insert("step_tensor", &[1], &[step as i64]).unwrap();
    c
}

/// Run as a child process: saves checkpoints 1, 2, 3, ... until killed.
#[test]
fn child_saver() {
    let Ok(dir) = std::env::var(ROLE) else { return };
    let dir = CheckpointDir::new(dir, 3).unwrap();
    for step in 1.. {
        dir.save(step, &checkpoint_of(step)).unwrap();
        println!("saved {step}");
    }
}

#[test]
fn killed_save_keeps_the_previous_checkpoint() {
    let exe = std::env::current_exe().unwrap();
    for trial in 0..5u64 {
        let tmp = tempfile::tempdir().unwrap();
        let mut child = Command::new(&exe)
            .args(["--exact", "child_saver", "--nocapture", "--test-threads=1"])
            .env(ROLE, tmp.path())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let dir = CheckpointDir::new(tmp.path(), 3).unwrap();
        // Wait for a first complete checkpoint, then kill at a varying moment.
        let start = Instant::now();
        while dir.steps().unwrap().is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no checkpoint was ever written"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(7 + 23 * trial));
        child.kill().unwrap();
        child.wait().unwrap();
        let (step, c) = dir.load_latest().unwrap().expect("a checkpoint survives");
        assert_eq!(c, {
            let mut e = checkpoint_of(step);
            e.set_meta("step", step);
            e
        });
        // Every checkpoint file that is there loads; the next save cleans temporaries up.
        for s in dir.steps().unwrap() {
            Checkpoint::load(&tmp.path().join(format!("ckpt-{s:010}.safetensors"))).unwrap();
        }
        dir.save(step + 1000, &checkpoint_of(1)).unwrap();
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}

#[test]
fn python_safetensors_reads_our_files() {
    let probe = Command::new("python3")
        .args(["-c", "import safetensors.numpy, numpy"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        assert!(
            std::env::var("FERROCOMM_REQUIRE_ALL").as_deref() != Ok("1"),
            "python3 with the safetensors and numpy packages is required (scripts/setup installs them)"
        );
        eprintln!("skipped: python3 with safetensors+numpy not found (run scripts/setup)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = CheckpointDir::new(tmp.path(), 1).unwrap();
    let mut c = Checkpoint::new();
    c.insert("linear.weight", &[1, 5], &[0.5f32, -1.25, 2.0, 3.5, 1e-3])
        .unwrap();
    c.insert("linear.bias", &[1], &[0.125f32]).unwrap();
    c.insert("adam.v", &[2, 3], &[1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0])
        .unwrap();
    c.insert(
        "half",
        &[2],
        &[half::f16::from_f32(1.5), half::f16::from_f32(-2.0)],
    )
    .unwrap();
    c.insert("ids", &[3], &[7i32, -8, 9]).unwrap();
    c.set_meta("epoch", 4);
    let path = dir.save(17, &c).unwrap();
    let script = r#"
import sys, json
from safetensors.numpy import load_file
from safetensors import safe_open
t = load_file(sys.argv[1])
with safe_open(sys.argv[1], framework="np") as f:
    meta = f.metadata()
out = {k: {"dtype": str(v.dtype), "shape": list(v.shape), "values": v.astype("float64").ravel().tolist()} for k, v in t.items()}
print(json.dumps({"tensors": out, "meta": meta}))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = &v["tensors"];
    assert_eq!(t["linear.weight"]["dtype"], "float32");
    assert_eq!(t["linear.weight"]["shape"], serde_json::json!([1, 5]));
    assert_eq!(
        t["linear.weight"]["values"],
        serde_json::json!([0.5, -1.25, 2.0, 3.5, 0.0010000000474974513])
    );
    assert_eq!(t["linear.bias"]["values"], serde_json::json!([0.125]));
    assert_eq!(t["adam.v"]["dtype"], "float64");
    assert_eq!(t["adam.v"]["shape"], serde_json::json!([2, 3]));
    assert_eq!(t["half"]["dtype"], "float16");
    assert_eq!(t["half"]["values"], serde_json::json!([1.5, -2.0]));
    assert_eq!(t["ids"]["dtype"], "int32");
    assert_eq!(t["ids"]["values"], serde_json::json!([7.0, -8.0, 9.0]));
    assert_eq!(v["meta"]["epoch"], "4");
    assert_eq!(v["meta"]["step"], "17");
}
