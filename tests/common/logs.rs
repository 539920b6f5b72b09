//! Log capture: one global subscriber at TRACE for the whole test binary.

use std::sync::{Arc, Mutex, OnceLock};

#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Install the capturing subscriber (once); every test of a binary that reads the logs calls
/// it first, so that all of the binary's log output lands in the buffer.
pub fn capture_logs() {
    buffer();
}

fn buffer() -> &'static LogBuffer {
    static BUFFER: OnceLock<LogBuffer> = OnceLock::new();
    BUFFER.get_or_init(|| {
        let buffer = LogBuffer::default();
        let writer = buffer.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init()
            .expect("this test binary installs the only global subscriber");
        buffer
    })
}

/// Everything any test of this binary logged so far (tracing events at every level, and `log`
/// records of dependencies such as rustls).
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&buffer().0.lock().unwrap()).into_owned()
}
