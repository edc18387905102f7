// Replaces a picture the browser could not decode by a visible message (a truncated file would
// otherwise show as an empty box), and records the count on <body data-images-ok="decoded/total">
// so automated checks can read it from the DOM.  Inline: the page loads nothing from outside.
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img'), ok = 0;
  imgs.forEach(function (img) {
    if (img.complete && img.naturalWidth > 0) { ok += 1; return; }
    var p = document.createElement('p');
    p.className = 'note error';
    p.textContent = 'This picture could not be displayed: ' + img.alt;
    img.replaceWith(p);
  });
  document.body.setAttribute('data-images-ok', ok + '/' + imgs.length);
});
