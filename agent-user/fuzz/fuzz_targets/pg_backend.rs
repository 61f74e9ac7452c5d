//! Fuzzes the PostgreSQL backend (server -> client) decoder. Beyond "no
//! panic", it checks the decoder contract: `Ok(None)` consumes nothing,
//! `Ok(Some)` consumes exactly its raw frame, and every decoded message
//! re-encodes to the very bytes it came from.
#![no_main]

use agentgate::protocol::postgres::{BackendDecoder, decode_ssl_response};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

/// Small cap so the fuzzer also reaches `FrameTooLarge`.
const MAX_FRAME_LEN: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let mut decoder = BackendDecoder::new(MAX_FRAME_LEN);
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match decoder.decode(&mut buf) {
            Ok(Some(frame)) => {
                assert_eq!(before - buf.len(), frame.raw.len());
                let mut out = BytesMut::new();
                frame
                    .msg
                    .encode(&mut out)
                    .expect("a decoded message re-encodes");
                assert_eq!(&out[..], &frame.raw[..], "re-encoding is byte-identical");
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) consumed input");
                break;
            }
            Err(_) => break,
        }
    }
    let _ = decode_ssl_response(&mut BytesMut::from(data));
});
