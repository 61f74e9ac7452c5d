//! Codec tests: round trips for every message, incremental feeding, framing
//! errors, captured byte fixtures, and a deterministic no-panic fuzz run.
//! Authentication state-machine tests live next to the code in `auth.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use bytes::{BufMut, Bytes, BytesMut};

use super::backend::{self, field};
use super::frontend::{self, PROTOCOL_VERSION_3_0};
use super::*;

fn s(v: &str) -> String {
    v.to_owned()
}

fn startup_messages() -> Vec<FrontendMessage> {
    vec![
        FrontendMessage::startup(vec![
            (s("user"), s("agent")),
            (s("database"), s("shop")),
            (s("application_name"), s("agentgate test ✓")),
        ]),
        FrontendMessage::StartupMessage {
            protocol_version: PROTOCOL_VERSION_3_0 + 2,
            params: vec![],
        },
        FrontendMessage::SSLRequest,
        FrontendMessage::GSSENCRequest,
        FrontendMessage::CancelRequest {
            process_id: 4242,
            secret_key: Bytes::from_static(&[0xde, 0xad, 0xbe, 0xef]),
        },
        FrontendMessage::CancelRequest {
            process_id: -1,
            secret_key: Bytes::from(vec![7u8; 32]),
        },
    ]
}

fn tagged_frontend_messages() -> Vec<FrontendMessage> {
    vec![
        FrontendMessage::Query {
            sql: s("SELECT * FROM orders WHERE note = 'héllo'"),
        },
        FrontendMessage::Query { sql: s("") },
        FrontendMessage::Parse {
            name: s("s1"),
            query: s("SELECT $1::int, $2"),
            param_types: vec![23, 0, u32::MAX],
        },
        FrontendMessage::Parse {
            name: s(""),
            query: s("SELECT 1"),
            param_types: vec![],
        },
        FrontendMessage::Bind {
            portal: s("p1"),
            statement: s("s1"),
            param_formats: vec![1, 0],
            params: vec![
                Some(Bytes::from_static(&[0, 0, 0, 42])),
                None,
                Some(Bytes::new()),
            ],
            result_formats: vec![1],
        },
        FrontendMessage::Bind {
            portal: s(""),
            statement: s(""),
            param_formats: vec![],
            params: vec![],
            result_formats: vec![],
        },
        FrontendMessage::Describe {
            kind: Target::Statement,
            name: s("s1"),
        },
        FrontendMessage::Describe {
            kind: Target::Portal,
            name: s(""),
        },
        FrontendMessage::Execute {
            portal: s("p1"),
            max_rows: 100,
        },
        FrontendMessage::Close {
            kind: Target::Portal,
            name: s("p1"),
        },
        FrontendMessage::Close {
            kind: Target::Statement,
            name: s("s1"),
        },
        FrontendMessage::Sync,
        FrontendMessage::Flush,
        FrontendMessage::CopyData(Bytes::from_static(b"1\tfoo\n2\tbar\n")),
        FrontendMessage::CopyData(Bytes::new()),
        FrontendMessage::CopyDone,
        FrontendMessage::CopyFail {
            message: s("client gave up"),
        },
        FrontendMessage::FunctionCall(Bytes::from_static(&[0, 0, 4, 0, 0, 0, 0, 0, 0, 0])),
        FrontendMessage::Terminate,
        FrontendMessage::password(b"hunter2").unwrap(),
        FrontendMessage::sasl_initial_response("SCRAM-SHA-256", Some(b"n,,n=,r=abc")).unwrap(),
        FrontendMessage::sasl_initial_response("X-NO-DATA", None).unwrap(),
        FrontendMessage::sasl_response(b"c=biws,r=abcdef,p=cHJvb2Y="),
    ]
}

fn backend_messages() -> Vec<BackendMessage> {
    vec![
        BackendMessage::Authentication(Authentication::Ok),
        BackendMessage::Authentication(Authentication::CleartextPassword),
        BackendMessage::Authentication(Authentication::Md5Password {
            salt: [1, 2, 3, 0xff],
        }),
        BackendMessage::Authentication(Authentication::Sasl {
            mechanisms: vec![s("SCRAM-SHA-256-PLUS"), s("SCRAM-SHA-256")],
        }),
        BackendMessage::Authentication(Authentication::Sasl { mechanisms: vec![] }),
        BackendMessage::Authentication(Authentication::SaslContinue(Bytes::from_static(
            b"r=abc,s=c2FsdA==,i=4096",
        ))),
        BackendMessage::Authentication(Authentication::SaslFinal(Bytes::from_static(b"v=xyz="))),
        BackendMessage::Authentication(Authentication::Other {
            code: 7,
            data: Bytes::new(),
        }),
        BackendMessage::Authentication(Authentication::Other {
            code: 8,
            data: Bytes::from_static(b"gss token"),
        }),
        BackendMessage::BackendKeyData {
            process_id: 31337,
            secret_key: Bytes::from_static(&[1, 2, 3, 4]),
        },
        BackendMessage::BackendKeyData {
            process_id: 31337,
            secret_key: Bytes::from(vec![9u8; 256]),
        },
        BackendMessage::ParameterStatus {
            name: s("server_version"),
            value: s("15.4"),
        },
        BackendMessage::ReadyForQuery {
            status: TransactionStatus::Idle,
        },
        BackendMessage::ReadyForQuery {
            status: TransactionStatus::InTransaction,
        },
        BackendMessage::ReadyForQuery {
            status: TransactionStatus::Failed,
        },
        BackendMessage::RowDescription(vec![
            FieldDescription {
                name: s("id"),
                table_oid: 16384,
                column_attr: 1,
                type_oid: 23,
                type_size: 4,
                type_modifier: -1,
                format: 0,
            },
            FieldDescription {
                name: s("email"),
                table_oid: 16384,
                column_attr: 2,
                type_oid: 1043,
                type_size: -1,
                type_modifier: 259,
                format: 1,
            },
        ]),
        BackendMessage::RowDescription(vec![]),
        BackendMessage::DataRow(vec![
            Some(Bytes::from_static(b"1")),
            None,
            Some(Bytes::new()),
            Some(Bytes::from_static(b"alice@example.com")),
        ]),
        BackendMessage::DataRow(vec![]),
        BackendMessage::CommandComplete {
            tag: s("INSERT 0 1"),
        },
        BackendMessage::EmptyQueryResponse,
        BackendMessage::ErrorResponse(
            ErrorFields::error("22012", "division by zero").with_hint("don't"),
        ),
        BackendMessage::NoticeResponse(ErrorFields::new(vec![
            (field::SEVERITY, s("NOTICE")),
            (field::CODE, s("00000")),
            (field::MESSAGE, s("hi")),
        ])),
        BackendMessage::ErrorResponse(ErrorFields::default()),
        BackendMessage::ParseComplete,
        BackendMessage::BindComplete,
        BackendMessage::CloseComplete,
        BackendMessage::NoData,
        BackendMessage::PortalSuspended,
        BackendMessage::ParameterDescription(vec![23, 25, u32::MAX]),
        BackendMessage::CopyInResponse {
            format: 0,
            column_formats: vec![0, 0],
        },
        BackendMessage::CopyOutResponse {
            format: 1,
            column_formats: vec![1],
        },
        BackendMessage::CopyBothResponse {
            format: 0,
            column_formats: vec![],
        },
        BackendMessage::CopyData(Bytes::from_static(b"row\n")),
        BackendMessage::CopyDone,
        BackendMessage::NotificationResponse {
            process_id: 99,
            channel: s("jobs"),
            payload: s("{\"id\":1}"),
        },
        BackendMessage::NegotiateProtocolVersion {
            minor: 0,
            unrecognized: vec![s("_pq_.compression")],
        },
        BackendMessage::FunctionCallResponse(Some(Bytes::from_static(&[0, 0, 0, 1]))),
        BackendMessage::FunctionCallResponse(None),
        insufficient_privilege(
            "permission denied by agentgate policy",
            Some("rule deny-ddl"),
        ),
    ]
}

fn startup_decoder() -> FrontendDecoder {
    FrontendDecoder::default()
}

fn tagged_decoder() -> FrontendDecoder {
    FrontendDecoder::tagged(DEFAULT_MAX_FRAME_LEN)
}

fn encoded_frontend(msg: &FrontendMessage) -> Bytes {
    msg.to_bytes().unwrap()
}

fn encoded_backend(msg: &BackendMessage) -> Bytes {
    msg.to_bytes().unwrap()
}

/// Decodes exactly one frame that must fill `bytes` completely.
fn decode_one<M>(
    bytes: &[u8],
    mut decode: impl FnMut(&mut BytesMut) -> Result<Option<Frame<M>>, DecodeError>,
) -> Result<Frame<M>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let frame = decode(&mut buf)?.expect("a complete frame");
    assert!(buf.is_empty(), "frame did not consume the whole input");
    Ok(frame)
}

fn frontend_one(bytes: &[u8], startup: bool) -> Result<Frame<FrontendMessage>, DecodeError> {
    let mut dec = if startup {
        startup_decoder()
    } else {
        tagged_decoder()
    };
    decode_one(bytes, |b| dec.decode(b))
}

fn backend_one(bytes: &[u8]) -> Result<Frame<BackendMessage>, DecodeError> {
    let mut dec = BackendDecoder::default();
    decode_one(bytes, |b| dec.decode(b))
}

// ---------------------------------------------------------------- round trips

#[test]
fn every_frontend_message_round_trips() {
    for (startup, msgs) in [
        (true, startup_messages()),
        (false, tagged_frontend_messages()),
    ] {
        for msg in msgs {
            let bytes = encoded_frontend(&msg);
            let frame = frontend_one(&bytes, startup).unwrap();
            assert_eq!(frame.msg, msg);
            assert_eq!(
                frame.raw,
                bytes,
                "raw keeps the exact frame of {}",
                msg.name()
            );
            assert_eq!(msg.tag().is_none(), startup);
            if let Some(tag) = msg.tag() {
                assert_eq!(bytes[0], tag);
            }
        }
    }
}

#[test]
fn every_backend_message_round_trips() {
    for msg in backend_messages() {
        let bytes = encoded_backend(&msg);
        assert_eq!(bytes[0], msg.tag());
        let frame = backend_one(&bytes).unwrap();
        assert_eq!(frame.msg, msg);
        assert_eq!(
            frame.raw,
            bytes,
            "raw keeps the exact frame of {}",
            msg.name()
        );
    }
}

#[test]
fn frame_from_message_matches_encoding() {
    let frame = Frame::<BackendMessage>::from_message(BackendMessage::NoData).unwrap();
    assert_eq!(&frame.raw[..], b"n\x00\x00\x00\x04");
    let frame = Frame::<FrontendMessage>::from_message(FrontendMessage::Sync).unwrap();
    assert_eq!(&frame.raw[..], b"S\x00\x00\x00\x04");
    assert_eq!(frame.into_message(), FrontendMessage::Sync);
}

// ------------------------------------------------------------ partial input

fn assert_every_prefix_is_incomplete<M: std::fmt::Debug>(
    bytes: &[u8],
    mut decode: impl FnMut(&mut BytesMut) -> Result<Option<Frame<M>>, DecodeError>,
) {
    for cut in 0..bytes.len() {
        let mut buf = BytesMut::from(&bytes[..cut]);
        let result = decode(&mut buf);
        assert!(
            matches!(result, Ok(None)),
            "prefix {cut}/{} gave {result:?}",
            bytes.len()
        );
        assert_eq!(&buf[..], &bytes[..cut], "prefix {cut} consumed bytes");
    }
    let mut buf = BytesMut::from(bytes);
    assert!(matches!(decode(&mut buf), Ok(Some(_))));
    assert!(buf.is_empty());
}

#[test]
fn every_prefix_of_every_message_waits_for_more() {
    for msg in startup_messages() {
        let bytes = encoded_frontend(&msg);
        assert_every_prefix_is_incomplete(&bytes, |b| startup_decoder().decode(b));
    }
    for msg in tagged_frontend_messages() {
        let bytes = encoded_frontend(&msg);
        assert_every_prefix_is_incomplete(&bytes, |b| tagged_decoder().decode(b));
    }
    for msg in backend_messages() {
        let bytes = encoded_backend(&msg);
        assert_every_prefix_is_incomplete(&bytes, |b| BackendDecoder::default().decode(b));
    }
}

#[test]
fn byte_by_byte_feeding_yields_each_message_once() {
    let msgs = backend_messages();
    let mut stream = BytesMut::new();
    for msg in &msgs {
        msg.encode(&mut stream).unwrap();
    }
    let mut dec = BackendDecoder::default();
    let mut buf = BytesMut::new();
    let mut decoded = Vec::new();
    for byte in stream.iter() {
        buf.put_u8(*byte);
        while let Some(frame) = dec.decode(&mut buf).unwrap() {
            decoded.push(frame.msg);
        }
    }
    assert_eq!(decoded, msgs);
    assert!(buf.is_empty());
}

// --------------------------------------------------------------- pipelining

#[test]
fn pipelined_frontend_messages_decode_in_order() {
    let msgs = tagged_frontend_messages();
    let mut buf = BytesMut::new();
    for msg in &msgs {
        msg.encode(&mut buf).unwrap();
    }
    let mut dec = tagged_decoder();
    for msg in &msgs {
        let frame = dec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(&frame.msg, msg);
        assert_eq!(frame.raw, encoded_frontend(msg));
    }
    assert!(dec.decode(&mut buf).unwrap().is_none());
}

#[test]
fn pipelined_backend_messages_decode_in_order() {
    let msgs = backend_messages();
    let mut buf = BytesMut::new();
    for msg in &msgs {
        msg.encode(&mut buf).unwrap();
    }
    // A partial trailing frame must stay buffered.
    buf.put_slice(b"Z\x00\x00");
    let mut dec = BackendDecoder::default();
    for msg in &msgs {
        assert_eq!(&dec.decode(&mut buf).unwrap().unwrap().msg, msg);
    }
    assert!(dec.decode(&mut buf).unwrap().is_none());
    assert_eq!(&buf[..], b"Z\x00\x00");
}

#[test]
fn extended_query_pipeline_in_one_read() {
    let msgs = vec![
        FrontendMessage::Parse {
            name: s(""),
            query: s("SELECT $1"),
            param_types: vec![25],
        },
        FrontendMessage::Bind {
            portal: s(""),
            statement: s(""),
            param_formats: vec![0],
            params: vec![Some(Bytes::from_static(b"x"))],
            result_formats: vec![0],
        },
        FrontendMessage::Describe {
            kind: Target::Portal,
            name: s(""),
        },
        FrontendMessage::Execute {
            portal: s(""),
            max_rows: 0,
        },
        FrontendMessage::Sync,
    ];
    let mut buf = BytesMut::new();
    for msg in &msgs {
        msg.encode(&mut buf).unwrap();
    }
    let mut dec = tagged_decoder();
    let decoded: Vec<_> = std::iter::from_fn(|| dec.decode(&mut buf).unwrap())
        .map(|f| f.msg)
        .collect();
    assert_eq!(decoded, msgs);
}

// ------------------------------------------------------------ startup phase

#[test]
fn startup_message_switches_to_tagged_phase() {
    let mut dec = startup_decoder();
    assert_eq!(dec.phase(), Phase::Startup);
    let mut buf = BytesMut::new();
    FrontendMessage::startup(vec![(s("user"), s("agent"))])
        .encode(&mut buf)
        .unwrap();
    FrontendMessage::Query { sql: s("SELECT 1") }
        .encode(&mut buf)
        .unwrap();
    let first = dec.decode(&mut buf).unwrap().unwrap();
    assert!(matches!(first.msg, FrontendMessage::StartupMessage { .. }));
    assert_eq!(dec.phase(), Phase::Tagged);
    let second = dec.decode(&mut buf).unwrap().unwrap();
    assert_eq!(second.msg, FrontendMessage::Query { sql: s("SELECT 1") });
}

#[test]
fn ssl_request_then_startup_message() {
    let mut dec = startup_decoder();
    let mut buf = BytesMut::from(&b"\x00\x00\x00\x08\x04\xd2\x16\x2f"[..]);
    let frame = dec.decode(&mut buf).unwrap().unwrap();
    assert_eq!(frame.msg, FrontendMessage::SSLRequest);
    assert_eq!(&frame.raw[..], b"\x00\x00\x00\x08\x04\xd2\x16\x2f");
    // The proxy answered 'N'; the client continues in the startup phase.
    assert_eq!(dec.phase(), Phase::Startup);

    FrontendMessage::GSSENCRequest.encode(&mut buf).unwrap();
    assert_eq!(
        dec.decode(&mut buf).unwrap().unwrap().msg,
        FrontendMessage::GSSENCRequest
    );
    assert_eq!(dec.phase(), Phase::Startup);

    let startup = FrontendMessage::startup(vec![(s("user"), s("agent"))]);
    startup.encode(&mut buf).unwrap();
    assert_eq!(dec.decode(&mut buf).unwrap().unwrap().msg, startup);
    assert_eq!(dec.phase(), Phase::Tagged);
}

#[test]
fn cancel_request_keeps_startup_phase() {
    let mut dec = startup_decoder();
    let bytes = b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x30\x39\x01\x02\x03\x04";
    let mut buf = BytesMut::from(&bytes[..]);
    let frame = dec.decode(&mut buf).unwrap().unwrap();
    assert_eq!(
        frame.msg,
        FrontendMessage::CancelRequest {
            process_id: 12345,
            secret_key: Bytes::from_static(&[1, 2, 3, 4]),
        }
    );
    assert_eq!(dec.phase(), Phase::Startup);
}

#[test]
fn startup_phase_rejects_bad_codes_and_layouts() {
    let cases: Vec<(&[u8], DecodeError)> = vec![
        // Protocol 2.0.
        (
            b"\x00\x00\x00\x09\x00\x02\x00\x00\x00",
            DecodeError::UnsupportedProtocolVersion { major: 2, minor: 0 },
        ),
        // 1234.5679 is a request code, but not one that exists.
        (
            b"\x00\x00\x00\x08\x04\xd2\x16\x33",
            DecodeError::UnknownRequestCode(80_877_107),
        ),
        // SSLRequest must be exactly 8 bytes.
        (
            b"\x00\x00\x00\x0c\x04\xd2\x16\x2f\x00\x00\x00\x00",
            DecodeError::TrailingBytes {
                message: "SSLRequest",
                count: 4,
            },
        ),
        // CancelRequest with a 2-byte key.
        (
            b"\x00\x00\x00\x0e\x04\xd2\x16\x2e\x00\x00\x00\x01\x00\x00",
            DecodeError::Malformed {
                message: "CancelRequest",
                reason: "secret key must be 4 to 256 bytes",
            },
        ),
        // Parameter list without the final terminator.
        (
            b"\x00\x00\x00\x13\x00\x03\x00\x00user\x00agent\x00",
            DecodeError::MissingNul {
                message: "StartupMessage",
            },
        ),
        // Bytes after the terminator.
        (
            b"\x00\x00\x00\x0a\x00\x03\x00\x00\x00x",
            DecodeError::TrailingBytes {
                message: "StartupMessage",
                count: 1,
            },
        ),
        // Parameter name without a value.
        (
            b"\x00\x00\x00\x0e\x00\x03\x00\x00user\x00\x00",
            DecodeError::MissingNul {
                message: "StartupMessage",
            },
        ),
    ];
    for (bytes, expected) in cases {
        assert_eq!(
            frontend_one(bytes, true).unwrap_err(),
            expected,
            "{bytes:?}"
        );
    }
}

#[test]
fn tls_client_hello_in_startup_phase_is_rejected_early() {
    // A client doing direct TLS (PostgreSQL 17 sslnegotiation=direct) starts
    // with a TLS record header; its "length" is far over the startup cap.
    let mut buf = BytesMut::from(&b"\x16\x03\x01\x02\x00\x01"[..]);
    assert!(matches!(
        startup_decoder().decode(&mut buf),
        Err(DecodeError::FrameTooLarge { max: 10_000, .. })
    ));
}

// ---------------------------------------------------------------- framing

#[test]
fn oversized_frame_is_rejected_from_its_header_alone() {
    let one_gib: i32 = 1 << 30;
    for tag in [frontend::QUERY, frontend::COPY_DATA] {
        let mut buf = BytesMut::with_capacity(16);
        buf.put_u8(tag);
        buf.put_i32(one_gib);
        let capacity = buf.capacity();
        assert_eq!(
            tagged_decoder().decode(&mut buf).unwrap_err(),
            DecodeError::FrameTooLarge {
                len: 1 << 30,
                max: DEFAULT_MAX_FRAME_LEN,
            }
        );
        assert_eq!(
            buf.capacity(),
            capacity,
            "nothing was allocated for the body"
        );
        assert_eq!(buf.len(), 5);
    }
    let mut buf = BytesMut::with_capacity(16);
    buf.put_u8(backend::DATA_ROW);
    buf.put_i32(one_gib);
    let capacity = buf.capacity();
    assert!(matches!(
        BackendDecoder::new(1024).decode(&mut buf),
        Err(DecodeError::FrameTooLarge {
            len: 1_073_741_824,
            max: 1024
        })
    ));
    assert_eq!(buf.capacity(), capacity);

    // Startup packets obey the server's 10000-byte cap even under a larger limit.
    let mut buf = BytesMut::new();
    buf.put_i32(10_001);
    assert_eq!(
        startup_decoder().decode(&mut buf).unwrap_err(),
        DecodeError::FrameTooLarge {
            len: 10_001,
            max: 10_000,
        }
    );
}

#[test]
fn custom_cap_is_inclusive() {
    let msg = FrontendMessage::Query { sql: s("abc") };
    let bytes = encoded_frontend(&msg);
    let len = bytes.len() - 1;
    let mut ok = FrontendDecoder::tagged(len);
    assert!(
        ok.decode(&mut BytesMut::from(&bytes[..]))
            .unwrap()
            .is_some()
    );
    let mut too_small = FrontendDecoder::tagged(len - 1);
    assert!(matches!(
        too_small.decode(&mut BytesMut::from(&bytes[..])),
        Err(DecodeError::FrameTooLarge { .. })
    ));
}

#[test]
fn negative_and_too_small_lengths_are_rejected() {
    for len in [-1i32, i32::MIN, 0, 3] {
        let mut buf = BytesMut::new();
        buf.put_u8(frontend::QUERY);
        buf.put_i32(len);
        assert_eq!(
            tagged_decoder().decode(&mut buf).unwrap_err(),
            DecodeError::InvalidLength { len, min: 4 }
        );
        let mut buf = BytesMut::new();
        buf.put_u8(backend::READY_FOR_QUERY);
        buf.put_i32(len);
        assert_eq!(
            BackendDecoder::default().decode(&mut buf).unwrap_err(),
            DecodeError::InvalidLength { len, min: 4 }
        );
    }
    for len in [-8i32, 0, 4, 7] {
        let mut buf = BytesMut::new();
        buf.put_i32(len);
        buf.put_i32(PROTOCOL_VERSION_3_0);
        assert_eq!(
            startup_decoder().decode(&mut buf).unwrap_err(),
            DecodeError::InvalidLength { len, min: 8 }
        );
    }
}

#[test]
fn unknown_tags_are_rejected_on_the_first_byte() {
    // 'Z' is a backend tag, 'Q' a frontend one: each is foreign in the other direction.
    assert_eq!(
        tagged_decoder()
            .decode(&mut BytesMut::from(&b"Z"[..]))
            .unwrap_err(),
        DecodeError::UnknownTag(b'Z')
    );
    assert_eq!(
        BackendDecoder::default()
            .decode(&mut BytesMut::from(&b"Q"[..]))
            .unwrap_err(),
        DecodeError::UnknownTag(b'Q')
    );
    assert_eq!(
        BackendDecoder::default()
            .decode(&mut BytesMut::from(&b"\x00\x00\x00\x00\x08"[..]))
            .unwrap_err(),
        DecodeError::UnknownTag(0)
    );
}

#[test]
fn trailing_bytes_inside_a_frame_are_rejected() {
    let frontend_cases: Vec<(&[u8], &str, usize)> = vec![
        (b"S\x00\x00\x00\x05\x00", "Sync", 1),
        (b"X\x00\x00\x00\x06ab", "Terminate", 2),
        (b"Q\x00\x00\x00\x0bSEL\x00ECT", "Query", 3),
        (
            b"E\x00\x00\x00\x0b\x00\x00\x00\x00\x00\x00\x00",
            "Execute",
            2,
        ),
        (b"D\x00\x00\x00\x07S\x00\x00", "Describe", 1),
    ];
    for (bytes, message, count) in frontend_cases {
        assert_eq!(
            frontend_one(bytes, false).unwrap_err(),
            DecodeError::TrailingBytes { message, count }
        );
    }
    let backend_cases: Vec<(&[u8], &str, usize)> = vec![
        (b"Z\x00\x00\x00\x06Ix", "ReadyForQuery", 1),
        (b"R\x00\x00\x00\x09\x00\x00\x00\x00!", "Authentication", 1),
        (b"1\x00\x00\x00\x05\x00", "ParseComplete", 1),
        (b"C\x00\x00\x00\x0dSELECT\x00\x00\x00", "CommandComplete", 2),
        (b"D\x00\x00\x00\x0c\x00\x01\x00\x00\x00\x01a!", "DataRow", 1),
        (b"E\x00\x00\x00\x06\x00!", "ErrorResponse", 1),
    ];
    for (bytes, message, count) in backend_cases {
        assert_eq!(
            backend_one(bytes).unwrap_err(),
            DecodeError::TrailingBytes { message, count }
        );
    }
}

#[test]
fn fields_past_the_frame_end_are_rejected() {
    // DataRow claims a 100-byte value inside a 10-byte frame.
    assert_eq!(
        backend_one(b"D\x00\x00\x00\x0a\x00\x01\x00\x00\x00\x64").unwrap_err(),
        DecodeError::Truncated { message: "DataRow" }
    );
    // Bind claims 65535 parameters with no bytes for them: refused before
    // any allocation sized by the count.
    assert_eq!(
        frontend_one(b"B\x00\x00\x00\x0a\x00\x00\x00\x00\xff\xff", false).unwrap_err(),
        DecodeError::Truncated { message: "Bind" }
    );
    // RowDescription claims 32767 fields.
    assert_eq!(
        backend_one(b"T\x00\x00\x00\x06\x7f\xff").unwrap_err(),
        DecodeError::Truncated {
            message: "RowDescription"
        }
    );
    // Query without its NUL terminator.
    assert_eq!(
        frontend_one(b"Q\x00\x00\x00\x07abc", false).unwrap_err(),
        DecodeError::MissingNul { message: "Query" }
    );
    // NegotiateProtocolVersion with a negative count.
    assert_eq!(
        backend_one(b"v\x00\x00\x00\x0c\x00\x00\x00\x00\xff\xff\xff\xff").unwrap_err(),
        DecodeError::Malformed {
            message: "NegotiateProtocolVersion",
            reason: "negative count",
        }
    );
}

#[test]
fn invalid_field_values_are_rejected() {
    assert_eq!(
        backend_one(b"Z\x00\x00\x00\x05X").unwrap_err(),
        DecodeError::Malformed {
            message: "ReadyForQuery",
            reason: "transaction status must be 'I', 'T' or 'E'",
        }
    );
    assert_eq!(
        frontend_one(b"C\x00\x00\x00\x06X\x00", false).unwrap_err(),
        DecodeError::Malformed {
            message: "Close",
            reason: "target must be 'S' or 'P'",
        }
    );
    // Value length -2 in a DataRow (only -1 means NULL).
    assert_eq!(
        backend_one(b"D\x00\x00\x00\x0a\x00\x01\xff\xff\xff\xfe").unwrap_err(),
        DecodeError::Malformed {
            message: "DataRow",
            reason: "negative value length",
        }
    );
    assert_eq!(
        backend_one(b"K\x00\x00\x00\x0a\x00\x00\x00\x01\xab\xcd").unwrap_err(),
        DecodeError::Malformed {
            message: "BackendKeyData",
            reason: "secret key must be 4 to 256 bytes",
        }
    );
}

#[test]
fn invalid_utf8_is_rejected() {
    assert_eq!(
        frontend_one(b"Q\x00\x00\x00\x08\xff\xfeA\x00", false).unwrap_err(),
        DecodeError::InvalidUtf8 { message: "Query" }
    );
    assert_eq!(
        frontend_one(b"P\x00\x00\x00\x0a\x00\xc3(\x00\x00\x00", false).unwrap_err(),
        DecodeError::InvalidUtf8 { message: "Parse" }
    );
    assert_eq!(
        backend_one(b"C\x00\x00\x00\x07\x80\x81\x00").unwrap_err(),
        DecodeError::InvalidUtf8 {
            message: "CommandComplete"
        }
    );
    assert_eq!(
        frontend_one(
            b"\x00\x00\x00\x0f\x00\x03\x00\x00u\x00\xed\xa0\x80\x00\x00",
            true
        )
        .unwrap_err(),
        DecodeError::InvalidUtf8 {
            message: "StartupMessage"
        }
    );
}

#[test]
fn body_error_consumes_only_the_bad_frame() {
    let mut buf = BytesMut::from(&b"Z\x00\x00\x00\x05XZ\x00\x00\x00\x05I"[..]);
    let mut dec = BackendDecoder::default();
    assert!(dec.decode(&mut buf).is_err());
    assert_eq!(
        dec.decode(&mut buf).unwrap().unwrap().msg,
        BackendMessage::ReadyForQuery {
            status: TransactionStatus::Idle
        }
    );
}

#[test]
fn parameter_counts_above_i16_max_are_accepted() {
    // libpq allows up to 65535 parameters; the server reads the count unsigned.
    let params: Vec<Option<Bytes>> = (0..40_000u32)
        .map(|i| (i % 3 != 0).then(|| Bytes::from(i.to_string())))
        .collect();
    let msg = FrontendMessage::Bind {
        portal: s(""),
        statement: s("bulk"),
        param_formats: vec![],
        params,
        result_formats: vec![],
    };
    let bytes = encoded_frontend(&msg);
    assert_eq!(frontend_one(&bytes, false).unwrap().msg, msg);
}

// ---------------------------------------------------------------- encoding

#[test]
fn encode_errors_leave_the_buffer_untouched() {
    let mut buf = BytesMut::from(&b"keep"[..]);
    let cases: Vec<(Result<(), EncodeError>, EncodeError)> = vec![
        (
            FrontendMessage::Query { sql: s("a\0b") }.encode(&mut buf),
            EncodeError::InteriorNul { message: "Query" },
        ),
        (
            FrontendMessage::startup(vec![(s(""), s("x"))]).encode(&mut buf),
            EncodeError::Invalid {
                message: "StartupMessage",
                reason: "an empty parameter name would end the list",
            },
        ),
        (
            FrontendMessage::StartupMessage {
                protocol_version: frontend::SSL_REQUEST_CODE,
                params: vec![],
            }
            .encode(&mut buf),
            EncodeError::Invalid {
                message: "StartupMessage",
                reason: "protocol major version must be 3",
            },
        ),
        (
            FrontendMessage::CancelRequest {
                process_id: 1,
                secret_key: Bytes::new(),
            }
            .encode(&mut buf),
            EncodeError::Invalid {
                message: "CancelRequest",
                reason: "secret key must be 4 to 256 bytes",
            },
        ),
        (
            BackendMessage::DataRow(vec![None; 70_000]).encode(&mut buf),
            EncodeError::TooManyItems {
                message: "DataRow",
                count: 70_000,
                max: 65_535,
            },
        ),
        (
            BackendMessage::ErrorResponse(ErrorFields::new(vec![(0, s("x"))])).encode(&mut buf),
            EncodeError::Invalid {
                message: "ErrorResponse",
                reason: "field code 0 would end the field list",
            },
        ),
        (
            BackendMessage::Authentication(Authentication::Other {
                code: 0,
                data: Bytes::new(),
            })
            .encode(&mut buf),
            EncodeError::Invalid {
                message: "Authentication",
                reason: "authentication code has a dedicated variant",
            },
        ),
        (
            BackendMessage::Authentication(Authentication::Sasl {
                mechanisms: vec![s("")],
            })
            .encode(&mut buf),
            EncodeError::Invalid {
                message: "AuthenticationSASL",
                reason: "an empty mechanism name would end the list",
            },
        ),
    ];
    for (result, expected) in cases {
        assert_eq!(result.unwrap_err(), expected);
    }
    assert_eq!(&buf[..], b"keep");
    assert_eq!(
        FrontendMessage::password(b"a\0b").unwrap_err(),
        EncodeError::InteriorNul {
            message: "PasswordMessage"
        }
    );
}

#[test]
fn encode_appends_after_existing_bytes() {
    let mut buf = BytesMut::from(&b"xx"[..]);
    BackendMessage::ReadyForQuery {
        status: TransactionStatus::InTransaction,
    }
    .encode(&mut buf)
    .unwrap();
    assert_eq!(&buf[..], b"xxZ\x00\x00\x00\x05T");
}

#[test]
fn synthesized_messages_have_the_documented_bytes() {
    let cases: Vec<(Bytes, &[u8])> = vec![
        (
            encoded_backend(&BackendMessage::Authentication(Authentication::Ok)),
            b"R\x00\x00\x00\x08\x00\x00\x00\x00",
        ),
        (
            encoded_backend(&BackendMessage::Authentication(
                Authentication::CleartextPassword,
            )),
            b"R\x00\x00\x00\x08\x00\x00\x00\x03",
        ),
        (
            encoded_backend(&BackendMessage::BackendKeyData {
                process_id: 1,
                secret_key: Bytes::from_static(&[0, 0, 0, 2]),
            }),
            b"K\x00\x00\x00\x0c\x00\x00\x00\x01\x00\x00\x00\x02",
        ),
        (
            encoded_frontend(&FrontendMessage::Terminate),
            b"X\x00\x00\x00\x04",
        ),
        (
            encoded_frontend(&FrontendMessage::SSLRequest),
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f",
        ),
        (
            encoded_frontend(&FrontendMessage::password(b"pw").unwrap()),
            b"p\x00\x00\x00\x07pw\x00",
        ),
        (
            encoded_frontend(&FrontendMessage::sasl_initial_response("M", None).unwrap()),
            b"p\x00\x00\x00\x0aM\x00\xff\xff\xff\xff",
        ),
    ];
    for (actual, expected) in cases {
        assert_eq!(&actual[..], expected);
    }
}

#[test]
fn insufficient_privilege_carries_sqlstate_and_both_severities() {
    let msg = insufficient_privilege("permission denied for table users", Some("policy p1"));
    let BackendMessage::ErrorResponse(fields) = &msg else {
        panic!("not an ErrorResponse: {msg:?}");
    };
    assert_eq!(fields.get(field::SEVERITY), Some("ERROR"));
    assert_eq!(fields.get(field::SEVERITY_NONLOCALIZED), Some("ERROR"));
    assert_eq!(fields.severity(), Some("ERROR"));
    assert_eq!(fields.code(), Some("42501"));
    assert_eq!(fields.message(), Some("permission denied for table users"));
    assert_eq!(fields.detail(), Some("policy p1"));
    assert_eq!(fields.hint(), None);
    let bytes = encoded_backend(&msg);
    assert_eq!(
        &bytes[..],
        &b"E\x00\x00\x00\x48SERROR\x00VERROR\x00C42501\x00Mpermission denied for table users\x00Dpolicy p1\x00\x00"[..]
    );

    let plain = insufficient_privilege(s("no"), None);
    let BackendMessage::ErrorResponse(fields) = plain else {
        panic!("not an ErrorResponse");
    };
    assert_eq!(fields.fields().len(), 4);
    assert_eq!(fields.detail(), None);
}

#[test]
fn error_fields_prefer_nonlocalized_severity() {
    let fields = ErrorFields::new(vec![
        (field::SEVERITY, s("FEHLER")),
        (field::SEVERITY_NONLOCALIZED, s("ERROR")),
    ]);
    assert_eq!(fields.severity(), Some("ERROR"));
    let old_server = ErrorFields::new(vec![(field::SEVERITY, s("ERROR"))]);
    assert_eq!(old_server.severity(), Some("ERROR"));
    let fatal = ErrorFields::fatal("28P01", "password authentication failed");
    assert_eq!(fatal.severity(), Some("FATAL"));
    assert_eq!(fatal.code(), Some("28P01"));
}

// ------------------------------------------------------ password helpers

#[test]
fn password_message_helpers() {
    assert_eq!(parse_password(b"hunter2\0").unwrap(), b"hunter2");
    assert_eq!(parse_password(b"\0").unwrap(), b"");
    assert_eq!(
        parse_password(b"hunter2").unwrap_err(),
        DecodeError::MissingNul {
            message: "PasswordMessage"
        }
    );
    assert_eq!(
        parse_password(b"").unwrap_err(),
        DecodeError::MissingNul {
            message: "PasswordMessage"
        }
    );
    assert_eq!(
        parse_password(b"a\0bc\0").unwrap_err(),
        DecodeError::TrailingBytes {
            message: "PasswordMessage",
            count: 3,
        }
    );

    let FrontendMessage::PasswordMessage(body) =
        FrontendMessage::sasl_initial_response("SCRAM-SHA-256", Some(b"n,,n=,r=xyz")).unwrap()
    else {
        panic!("not a PasswordMessage");
    };
    assert_eq!(
        parse_sasl_initial_response(body.as_bytes()).unwrap(),
        (s("SCRAM-SHA-256"), Some(Bytes::from_static(b"n,,n=,r=xyz")))
    );
    assert_eq!(
        parse_sasl_initial_response(b"M\0\xff\xff\xff\xff").unwrap(),
        (s("M"), None)
    );
    assert_eq!(
        parse_sasl_initial_response(b"M\0\x00\x00\x00\x05ab").unwrap_err(),
        DecodeError::Truncated {
            message: "SASLInitialResponse"
        }
    );
    assert_eq!(
        parse_sasl_initial_response(b"M\0\x00\x00\x00\x01ab").unwrap_err(),
        DecodeError::TrailingBytes {
            message: "SASLInitialResponse",
            count: 1,
        }
    );
    assert_eq!(&parse_sasl_response(b"c=biws")[..], b"c=biws");
}

#[test]
fn passwords_are_redacted_from_debug_output() {
    let msg = FrontendMessage::password(b"hunter2").unwrap();
    let bytes = encoded_frontend(&msg);
    let frame = frontend_one(&bytes, false).unwrap();
    let shown = format!("{msg:?} {frame:?} {:?}", frame.msg);
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("<redacted>"));
}

// ---------------------------------------------------------- SSL response

#[test]
fn ssl_response_byte() {
    let mut buf = BytesMut::from(&b"NR"[..]);
    assert_eq!(
        decode_ssl_response(&mut buf).unwrap(),
        Some(SslResponse::Refused)
    );
    assert_eq!(&buf[..], b"R");
    let mut buf = BytesMut::from(&b"S"[..]);
    assert_eq!(
        decode_ssl_response(&mut buf).unwrap(),
        Some(SslResponse::Accepted)
    );
    assert_eq!(decode_ssl_response(&mut BytesMut::new()).unwrap(), None);
    assert_eq!(
        decode_ssl_response(&mut BytesMut::from(&b"E"[..])).unwrap_err(),
        DecodeError::UnknownTag(b'E')
    );
}

// ------------------------------------------------------- captured fixtures

/// psql 15 connecting as `psql -h ... -U postgres postgres` with a UTF-8 locale.
const PSQL_STARTUP: &[u8] = b"\x00\x00\x00\x54\x00\x03\x00\x00\
user\x00postgres\x00database\x00postgres\x00\
application_name\x00psql\x00client_encoding\x00UTF8\x00\x00";

/// PostgreSQL 15's full answer to the simple query `select 1`.
const SELECT_ONE_RESPONSE: &[u8] = b"\
T\x00\x00\x00\x21\x00\x01?column?\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00\
D\x00\x00\x00\x0b\x00\x01\x00\x00\x00\x011\
C\x00\x00\x00\x0dSELECT 1\x00\
Z\x00\x00\x00\x05I";

/// PostgreSQL 15's ErrorResponse for `select * from nope`.
const UNDEFINED_TABLE_ERROR: &[u8] = b"E\x00\x00\x00\x67\
SERROR\x00VERROR\x00C42P01\x00Mrelation \"nope\" does not exist\x00P15\x00\
Fparse_relation.c\x00L1392\x00RparserOpenTable\x00\x00";

/// AuthenticationSASL as sent over TLS (channel binding offered first).
const SASL_OFFER_TLS: &[u8] = b"R\x00\x00\x00\x2a\x00\x00\x00\x0a\
SCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00";

/// The psql simple query `select 1;`.
const PSQL_SELECT_ONE_QUERY: &[u8] = b"Q\x00\x00\x00\x0eselect 1;\x00";

#[test]
fn fixture_psql_startup_message() {
    let frame = frontend_one(PSQL_STARTUP, true).unwrap();
    assert_eq!(
        frame.msg,
        FrontendMessage::StartupMessage {
            protocol_version: 196_608,
            params: vec![
                (s("user"), s("postgres")),
                (s("database"), s("postgres")),
                (s("application_name"), s("psql")),
                (s("client_encoding"), s("UTF8")),
            ],
        }
    );
    assert_eq!(&encoded_frontend(&frame.msg)[..], PSQL_STARTUP);

    let frame = frontend_one(PSQL_SELECT_ONE_QUERY, false).unwrap();
    assert_eq!(
        frame.msg,
        FrontendMessage::Query {
            sql: s("select 1;")
        }
    );
}

#[test]
fn fixture_select_one_response() {
    let mut buf = BytesMut::from(SELECT_ONE_RESPONSE);
    let mut dec = BackendDecoder::default();
    let frames: Vec<_> = std::iter::from_fn(|| dec.decode(&mut buf).unwrap()).collect();
    assert!(buf.is_empty());
    let msgs: Vec<_> = frames.iter().map(|f| f.msg.clone()).collect();
    assert_eq!(
        msgs,
        vec![
            BackendMessage::RowDescription(vec![FieldDescription {
                name: s("?column?"),
                table_oid: 0,
                column_attr: 0,
                type_oid: 23,
                type_size: 4,
                type_modifier: -1,
                format: 0,
            }]),
            BackendMessage::DataRow(vec![Some(Bytes::from_static(b"1"))]),
            BackendMessage::CommandComplete { tag: s("SELECT 1") },
            BackendMessage::ReadyForQuery {
                status: TransactionStatus::Idle
            },
        ]
    );
    // Forwarding raw frames reproduces the server's bytes exactly.
    let forwarded: Vec<u8> = frames.iter().flat_map(|f| f.raw.to_vec()).collect();
    assert_eq!(forwarded, SELECT_ONE_RESPONSE);
}

#[test]
fn fixture_masking_rewrites_only_the_data_row() {
    let mut buf = BytesMut::from(SELECT_ONE_RESPONSE);
    let mut dec = BackendDecoder::default();
    let mut out = BytesMut::new();
    while let Some(frame) = dec.decode(&mut buf).unwrap() {
        match frame.msg {
            BackendMessage::DataRow(values) => {
                let masked = values
                    .iter()
                    .map(|v| v.as_ref().map(|_| Bytes::from_static(b"***")))
                    .collect();
                BackendMessage::DataRow(masked).encode(&mut out).unwrap();
            }
            _ => out.put_slice(&frame.raw),
        }
    }
    let mut expected = Vec::new();
    expected.extend_from_slice(&SELECT_ONE_RESPONSE[..34]);
    expected.extend_from_slice(b"D\x00\x00\x00\x0d\x00\x01\x00\x00\x00\x03***");
    expected.extend_from_slice(&SELECT_ONE_RESPONSE[34 + 12..]);
    assert_eq!(&out[..], &expected[..]);
}

#[test]
fn fixture_error_response() {
    let frame = backend_one(UNDEFINED_TABLE_ERROR).unwrap();
    let BackendMessage::ErrorResponse(fields) = &frame.msg else {
        panic!("not an ErrorResponse: {:?}", frame.msg);
    };
    assert_eq!(fields.severity(), Some("ERROR"));
    assert_eq!(fields.code(), Some("42P01"));
    assert_eq!(fields.message(), Some("relation \"nope\" does not exist"));
    assert_eq!(fields.get(field::POSITION), Some("15"));
    assert_eq!(fields.get(field::ROUTINE), Some("parserOpenTable"));
    assert_eq!(fields.fields().len(), 8);
    assert_eq!(&encoded_backend(&frame.msg)[..], UNDEFINED_TABLE_ERROR);
}

#[test]
fn fixture_sasl_offer() {
    let frame = backend_one(SASL_OFFER_TLS).unwrap();
    assert_eq!(
        frame.msg,
        BackendMessage::Authentication(Authentication::Sasl {
            mechanisms: vec![s("SCRAM-SHA-256-PLUS"), s("SCRAM-SHA-256")],
        })
    );
}

// ------------------------------------------------------------ no-panic fuzz

/// xorshift64: tiny, deterministic, good enough to shake a parser.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % (n.max(1) as u64)) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// Runs a decoder over `input` until it needs more bytes or fails, checking
/// the contract on the way: `Ok(None)` consumes nothing, `Ok(Some)` consumes
/// exactly its raw frame, and every decoded message re-encodes to that frame.
fn drive<M>(
    input: &[u8],
    mut decode: impl FnMut(&mut BytesMut) -> Result<Option<Frame<M>>, DecodeError>,
    encode: impl Fn(&M) -> Result<Bytes, EncodeError>,
) -> usize {
    let mut buf = BytesMut::from(input);
    let mut decoded = 0;
    loop {
        let before = buf.len();
        match decode(&mut buf) {
            Ok(Some(frame)) => {
                assert_eq!(before - buf.len(), frame.raw.len());
                let again = encode(&frame.msg).expect("a decoded message re-encodes");
                assert_eq!(again, frame.raw, "re-encoding is byte-identical");
                decoded += 1;
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "Ok(None) consumed input");
                break;
            }
            Err(_) => break,
        }
    }
    decoded
}

/// Returns how many frames decoded, so the caller can check that the run
/// reached the message parsers instead of failing on every header.
fn drive_all(input: &[u8]) -> usize {
    let enc_f = |m: &FrontendMessage| m.to_bytes();
    let enc_b = |m: &BackendMessage| m.to_bytes();
    let mut dec = FrontendDecoder::new(4096);
    let mut decoded = drive(input, |b| dec.decode(b), enc_f);
    let mut dec = FrontendDecoder::tagged(4096);
    decoded += drive(input, |b| dec.decode(b), enc_f);
    let mut dec = BackendDecoder::new(4096);
    decoded += drive(input, |b| dec.decode(b), enc_b);
    let _ = parse_password(input);
    let _ = parse_sasl_initial_response(input);
    decoded
}

fn mutate(rng: &mut XorShift, seed: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..=rng.below(2) {
        let len = data.len();
        // Body bytes (past a tagged header) are hit more often than headers,
        // so that most mutants reach the message parsers.
        let body_pos = |rng: &mut XorShift| {
            if len > 5 && rng.below(4) != 0 {
                5 + rng.below(len - 5)
            } else {
                rng.below(len)
            }
        };
        match rng.below(7) {
            0 if len > 0 => {
                let i = body_pos(rng);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = body_pos(rng);
                data[i] = rng.byte();
            }
            2 => data.truncate(rng.below(len + 1)),
            3 => {
                let i = rng.below(len + 1);
                data.insert(i, rng.byte());
            }
            4 if len > 0 => {
                let i = rng.below(len);
                data.remove(i);
            }
            5 if len > 0 => {
                // Interesting length-word values at a random offset.
                let i = rng.below(len);
                let v: i32 = [0, 3, 4, 5, -1, i32::MAX, i32::MIN, 0x7fff][rng.below(8)];
                for (k, b) in v.to_be_bytes().into_iter().enumerate() {
                    if let Some(slot) = data.get_mut(i + k) {
                        *slot = b;
                    }
                }
            }
            _ => {
                let a = rng.below(len + 1);
                let b = rng.below(len + 1);
                let (a, b) = (a.min(b), a.max(b));
                let chunk = data[a..b].to_vec();
                data.extend_from_slice(&chunk);
            }
        }
    }
    data
}

#[test]
fn decoders_never_panic_on_random_or_mutated_input() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    for msg in startup_messages().iter().chain(&tagged_frontend_messages()) {
        seeds.push(encoded_frontend(msg).to_vec());
    }
    for msg in backend_messages() {
        seeds.push(encoded_backend(&msg).to_vec());
    }
    seeds.extend(
        [
            PSQL_STARTUP,
            SELECT_ONE_RESPONSE,
            UNDEFINED_TABLE_ERROR,
            SASL_OFFER_TLS,
        ]
        .map(<[u8]>::to_vec),
    );
    let pipelined: Vec<u8> = seeds.concat();

    let mut decoded = 0;
    for seed in &seeds {
        decoded += drive_all(seed);
    }
    decoded += drive_all(&pipelined);

    // Pure noise, with and without a plausible header.
    for _ in 0..2000 {
        let len = rng.below(48);
        let mut data: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
        if rng.below(2) == 0 && data.len() >= 5 {
            // A known tag and a consistent length, so the noise reaches a body parser.
            const TAGS: &[u8] = b"BCdcfDEHFPpQSXRK2CGHWDIEVvnNAt1sZT";
            data[0] = TAGS[rng.below(TAGS.len())];
            let body = (data.len() - 1) as i32;
            data[1..5].copy_from_slice(&body.to_be_bytes());
        }
        decoded += drive_all(&data);
    }
    // Mutations of valid messages and of whole pipelined streams.
    for _ in 0..6000 {
        let seed = &seeds[rng.below(seeds.len())];
        decoded += drive_all(&mutate(&mut rng, seed));
    }
    for _ in 0..50 {
        decoded += drive_all(&mutate(&mut rng, &pipelined));
    }
    eprintln!("fuzz run decoded {decoded} frames");
    assert!(decoded > 1500, "only {decoded} frames decoded");
}
