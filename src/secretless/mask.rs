//! Masking of values echoed back by an upstream: each occurrence of a value in a response body
//! becomes that secret's placeholder before the bytes reach the sandbox, also when the value is
//! split across chunks.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use zeroize::Zeroizing;

use super::snapshot::Snapshot;

/// Replaces values with placeholders in a byte stream. Holds back at most the longest value
/// minus one byte, so a value split across chunks is still found; the held bytes (which may be
/// the start of a value) are zeroised.
pub struct StreamMasker {
    snapshot: Arc<Snapshot>,
    held: Zeroizing<Vec<u8>>,
}

impl StreamMasker {
    pub fn new(snapshot: Arc<Snapshot>) -> Self {
        Self {
            snapshot,
            held: Zeroizing::new(Vec::new()),
        }
    }

    /// Masks `chunk`; returns what can be released now.
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        self.held.extend_from_slice(chunk);
        self.release(false)
    }

    /// Releases everything held (end of the stream).
    pub fn finish(&mut self) -> Bytes {
        self.release(true)
    }

    fn release(&mut self, all: bool) -> Bytes {
        let Some((matcher, masked)) = self.snapshot.value_matcher() else {
            return Bytes::from(std::mem::take(&mut *self.held));
        };
        let len = self.held.len();
        // A match starting before `boundary` lies wholly inside the buffer, whatever follows;
        // one starting later might continue in the next chunk.
        let boundary = if all {
            len
        } else {
            len.saturating_sub(self.snapshot.max_masked_len().saturating_sub(1))
        };
        let mut out = Vec::with_capacity(len);
        let mut at = 0;
        for m in matcher.find_iter(&self.held[..]) {
            if m.start() >= boundary {
                break;
            }
            out.extend_from_slice(&self.held[at..m.start()]);
            let entry = &self.snapshot.entries()[masked[m.pattern().as_usize()]];
            out.extend_from_slice(entry.placeholder.as_bytes());
            at = m.end();
        }
        let keep_from = at.max(boundary);
        out.extend_from_slice(&self.held[at..keep_from]);
        let rest = Zeroizing::new(self.held[keep_from..].to_vec());
        self.held = rest;
        Bytes::from(out)
    }
}

/// A response body passed through a [`StreamMasker`].
pub struct MaskedBody<B> {
    inner: B,
    masker: StreamMasker,
    /// Trailers received while bytes were still held: sent after them.
    trailers: Option<http::HeaderMap>,
    done: bool,
}

impl<B> MaskedBody<B> {
    pub fn new(inner: B, snapshot: Arc<Snapshot>) -> Self {
        Self {
            inner,
            masker: StreamMasker::new(snapshot),
            trailers: None,
            done: false,
        }
    }
}

impl<B> Body for MaskedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let out = this.masker.push(&data);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(frame) => {
                        // Trailers end the body: release what is held first.
                        this.trailers = frame.into_trailers().ok();
                        this.done = true;
                        let out = this.masker.finish();
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    this.done = true;
                    let out = this.masker.finish();
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // Masking changes the length.
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secretless::snapshot::{EgressMode, Entry, HostPattern};

    fn snapshot() -> Arc<Snapshot> {
        let entry = |name: &str, ph: &str, value: &str| Entry {
            env_name: name.into(),
            placeholder: ph.into(),
            value: value.to_owned().into(),
            allowed_hosts: vec![HostPattern::parse("a.com").unwrap()],
            inject_as: vec![],
            allow_plain_http: false,
        };
        Arc::new(
            Snapshot::new(
                vec![
                    entry("A", "asec_ph_AAAAAAAAAAAAAAAAAAAA", "secret-value-1"),
                    entry("B", "asec_ph_BBBBBBBBBBBBBBBBBBBB", "secret-value-1-longer"),
                    entry("C", "asec_ph_CCCCCCCCCCCCCCCCCCCC", "short"),
                ],
                EgressMode::Open,
            )
            .unwrap(),
        )
    }

    fn mask_in_chunks(input: &[u8], size: usize) -> Vec<u8> {
        let mut m = StreamMasker::new(snapshot());
        let mut out = Vec::new();
        for chunk in input.chunks(size) {
            out.extend_from_slice(&m.push(chunk));
        }
        out.extend_from_slice(&m.finish());
        out
    }

    #[test]
    fn a_value_split_across_chunks_of_any_size_is_masked() {
        let input =
            b"{\"token\":\"secret-value-1\",\"x\":\"secret-value-1-longer\",\"s\":\"short\"}";
        let want = b"{\"token\":\"asec_ph_AAAAAAAAAAAAAAAAAAAA\",\"x\":\"asec_ph_BBBBBBBBBBBBBBBBBBBB\",\"s\":\"short\"}";
        for size in 1..=input.len() {
            assert_eq!(
                String::from_utf8(mask_in_chunks(input, size)).unwrap(),
                String::from_utf8(want.to_vec()).unwrap(),
                "chunk size {size}"
            );
        }
    }

    #[test]
    fn bytes_without_values_pass_unchanged_and_nothing_is_lost() {
        let input: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        assert_eq!(mask_in_chunks(&input, 7), input);
        assert_eq!(mask_in_chunks(b"secret-value", 3), b"secret-value");
    }

    #[test]
    fn the_masker_holds_back_no_more_than_the_longest_value_minus_one() {
        let mut m = StreamMasker::new(snapshot());
        let out = m.push(&[b'x'; 100]);
        assert_eq!(out.len(), 100 - ("secret-value-1-longer".len() - 1));
    }

    #[tokio::test]
    async fn a_masked_body_masks_across_frames_and_keeps_trailers() {
        use http_body_util::BodyExt as _;
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"a secret-val"))),
            Ok(Frame::data(Bytes::from_static(b"ue-1 b"))),
            Ok(Frame::trailers(http::HeaderMap::from_iter([(
                http::header::ETAG,
                http::HeaderValue::from_static("t"),
            )]))),
        ];
        let inner = http_body_util::StreamBody::new(futures::stream::iter(frames));
        let collected = MaskedBody::new(inner, snapshot()).collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["etag"], "t");
        assert_eq!(
            collected.to_bytes(),
            Bytes::from_static(b"a asec_ph_AAAAAAAAAAAAAAAAAAAA b")
        );
    }
}
