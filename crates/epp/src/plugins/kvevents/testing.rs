//! Test fixtures: the KV-event captures of a real vLLM 0.32 server.

/// The fixtures folder.
pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/vllm-0.32-cpu");

/// The messages of a capture: per message a u32be frame count, then per frame a u32be length
/// and the bytes.
pub fn messages(name: &str) -> Vec<Vec<Vec<u8>>> {
    let raw = std::fs::read(format!("{FIXTURES}/{name}")).unwrap();
    let u32be = |at: &mut usize| {
        let v = u32::from_be_bytes(raw[*at..*at + 4].try_into().unwrap()) as usize;
        *at += 4;
        v
    };
    let mut out = Vec::new();
    let mut at = 0;
    while at < raw.len() {
        let n = u32be(&mut at);
        let mut frames = Vec::new();
        for _ in 0..n {
            let len = u32be(&mut at);
            frames.push(raw[at..at + len].to_vec());
            at += len;
        }
        out.push(frames);
    }
    out
}

/// The decoded messages of a capture.
pub fn decoded(name: &str) -> Vec<super::decode::EventMessage> {
    messages(name)
        .iter()
        .map(|frames| {
            let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
            super::decode::decode_frames(&refs).unwrap()
        })
        .collect()
}
