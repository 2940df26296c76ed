//! Turning one row of a numeric series column into padded values with a validity mask.

use crate::column::SeriesLength;

/// One decoded series row: `channels x len` values (channel-major), a mask (1 = observed,
/// 0 = padding, NaN or null) and the row's own length (before padding to `len`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SeriesRow {
    pub(crate) channels: usize,
    pub(crate) len: usize,
    pub(crate) length: usize,
    pub(crate) values: Vec<f32>,
    pub(crate) mask: Vec<u8>,
}

/// Builds a series row from its channels (each a sequence of optional values; `None` is a
/// null). `expected_channels` and `policy` come from the column spec.
pub(crate) fn build_series_row<'a, I>(
    channels: &[I],
    policy: SeriesLength,
    expected_channels: Option<usize>,
) -> Result<SeriesRow, String>
where
    I: Clone + ExactSizeIterator<Item = Option<f32>> + 'a,
{
    let c = channels.len();
    if let Some(want) = expected_channels {
        if want != c {
            return Err(format!("expected {want} channel(s), found {c}"));
        }
    }
    let lens: Vec<usize> = channels.iter().map(|ch| ch.len()).collect();
    let row_len = lens.iter().copied().max().unwrap_or(0);
    let len = match policy {
        SeriesLength::PadToBatchMax => row_len,
        SeriesLength::Fixed(n) => n,
        SeriesLength::Exact(n) => {
            if let Some((ch, &found)) = lens.iter().enumerate().find(|(_, &l)| l != n) {
                return Err(format!(
                    "expected series length {n}, found {found} (channel {ch})"
                ));
            }
            n
        }
    };
    let mut values = vec![0.0f32; c * len];
    let mut mask = vec![0u8; c * len];
    for (ci, ch) in channels.iter().enumerate() {
        let base = ci * len;
        for (t, v) in ch.clone().take(len).enumerate() {
            if let Some(v) = v.filter(|v| !v.is_nan()) {
                values[base + t] = v;
                mask[base + t] = 1;
            }
        }
    }
    Ok(SeriesRow {
        channels: c,
        len,
        length: row_len.min(len),
        values,
        mask,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(v: &[f32]) -> std::vec::IntoIter<Option<f32>> {
        v.iter().map(|&x| Some(x)).collect::<Vec<_>>().into_iter()
    }

    #[test]
    fn ragged_channels_pad_and_nan_is_masked() {
        let r = build_series_row(
            &[ch(&[1.0, f32::NAN, 3.0]), ch(&[4.0])],
            SeriesLength::PadToBatchMax,
            None,
        )
        .unwrap();
        assert_eq!((r.channels, r.len, r.length), (2, 3, 3));
        assert_eq!(r.values, vec![1.0, 0.0, 3.0, 4.0, 0.0, 0.0]);
        assert_eq!(r.mask, vec![1, 0, 1, 1, 0, 0]);
    }

    #[test]
    fn fixed_truncates_and_exact_rejects() {
        let r = build_series_row(&[ch(&[1.0, 2.0, 3.0])], SeriesLength::Fixed(2), None).unwrap();
        assert_eq!((r.values.clone(), r.length), (vec![1.0, 2.0], 2));
        let r = build_series_row(&[ch(&[1.0])], SeriesLength::Fixed(3), None).unwrap();
        assert_eq!((r.mask.clone(), r.length), (vec![1, 0, 0], 1));
        let e = build_series_row(&[ch(&[1.0])], SeriesLength::Exact(3), None).unwrap_err();
        assert!(e.contains("expected series length 3, found 1"), "{e}");
        let e = build_series_row(&[ch(&[1.0])], SeriesLength::PadToBatchMax, Some(2)).unwrap_err();
        assert!(e.contains("expected 2 channel(s), found 1"), "{e}");
    }

    #[test]
    fn nulls_are_masked() {
        let c = vec![Some(1.0), None].into_iter();
        let r = build_series_row(&[c], SeriesLength::PadToBatchMax, None).unwrap();
        assert_eq!(r.mask, vec![1, 0]);
    }
}
