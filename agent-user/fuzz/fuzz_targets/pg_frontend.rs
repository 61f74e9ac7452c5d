//! Fuzzes the PostgreSQL frontend (client -> server) decoder in both phases.
//! Beyond "no panic", it checks the decoder contract: `Ok(None)` consumes
//! nothing, `Ok(Some)` consumes exactly its raw frame, and every decoded
//! message re-encodes to the very bytes it came from.
#![no_main]

use agentgate::protocol::postgres::{
    FrontendDecoder, FrontendMessage, parse_password, parse_sasl_initial_response,
};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

/// Small cap so the fuzzer also reaches `FrameTooLarge`.
const MAX_FRAME_LEN: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the phase, so one corpus covers both parsers.
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    let mut decoder = if selector & 1 == 0 {
        FrontendDecoder::new(MAX_FRAME_LEN)
    } else {
        FrontendDecoder::tagged(MAX_FRAME_LEN)
    };
    let mut buf = BytesMut::from(input);
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
                if let FrontendMessage::PasswordMessage(body) = &frame.msg {
                    let _ = parse_password(body.as_bytes());
                    let _ = parse_sasl_initial_response(body.as_bytes());
                }
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) consumed input");
                break;
            }
            Err(_) => break,
        }
    }
});
